"""torch.nn twins backed by nnkernels: same constructor arguments, forward signature and
state_dict keys, so checkpoints move between torch.nn.X and nnkernels.nn.X both ways."""

from .batchnorm import BatchNorm1d, BatchNorm2d, SyncBatchNorm
from .conv import Conv2d
from .linear import Linear
from .loss import CrossEntropyLoss
from .rnn import LSTM, LSTMCell

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "CrossEntropyLoss",
    "LSTM",
    "LSTMCell",
    "Linear",
    "SyncBatchNorm",
]
