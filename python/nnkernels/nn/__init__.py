"""torch.nn twins backed by nnkernels: same constructor arguments, forward signature and
state_dict keys, so checkpoints move between torch.nn.X and nnkernels.nn.X both ways.

One file per area of torch.nn, each listing its modules in __all__; a module added to an area
file is exported here (and found by swap_layers) without editing this file.
"""

from . import batchnorm, conv, linear, loss, rnn
from .batchnorm import *  # noqa: F403
from .conv import *  # noqa: F403
from .linear import *  # noqa: F403
from .loss import *  # noqa: F403
from .rnn import *  # noqa: F403

__all__ = sorted(name for area in (batchnorm, conv, linear, loss, rnn) for name in area.__all__)
