"""The course's CNN (conv 64 -> conv 32 -> dense 10, with batch norm) on scikit-learn's digits,
torch layers vs nnkernels layers.

    python examples/cnn.py [--epochs N]
"""

import sys

import torch
from _digits import compare


def make_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 64, 3, padding=1),  # (N, 64, 8, 8)
        torch.nn.BatchNorm2d(64),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 32, 3, padding=1),  # (N, 32, 8, 8)
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 8 * 8, 10),
    )


if __name__ == "__main__":
    compare("CNN conv64-conv32-dense10", make_model, epochs=10, lr=0.02, argv=sys.argv[1:])
