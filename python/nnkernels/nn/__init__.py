"""torch.nn twins backed by nnkernels: same constructor arguments, forward signature and
state_dict keys, so checkpoints move between torch.nn.X and nnkernels.nn.X both ways."""

from .conv import Conv2d
from .linear import Linear

__all__ = ["Conv2d", "Linear"]
