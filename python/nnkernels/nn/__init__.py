"""torch.nn twins backed by nnkernels: same constructor arguments, forward signature and
state_dict keys, so checkpoints move between torch.nn.X and nnkernels.nn.X both ways."""

from .linear import Linear

__all__ = ["Linear"]
