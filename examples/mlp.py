"""The course's MLP (input-300-100-10) on scikit-learn's digits, torch layers vs nnkernels layers.

python examples/mlp.py [--epochs N]
"""

import sys

import torch
from _digits import compare


def make_model():
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 300),
        torch.nn.ReLU(),
        torch.nn.Linear(300, 100),
        torch.nn.ReLU(),
        torch.nn.Linear(100, 10),
    )


if __name__ == "__main__":
    compare("MLP 64-300-100-10", make_model, epochs=20, lr=0.05, argv=sys.argv[1:])
