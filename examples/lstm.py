"""An LSTM sequence classifier on scikit-learn's digits: each 8x8 image is read row by row (8 steps
of 8 pixels), the last hidden state goes through a dense layer; torch layers vs nnkernels layers.

    python examples/lstm.py [--epochs N]
"""

import sys

import torch
from _digits import compare


class RowReader(torch.nn.Module):
    def __init__(self, hidden=128):
        super().__init__()
        self.lstm = torch.nn.LSTM(8, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, 10)

    def forward(self, x):  # x (N, 1, 8, 8): rows are the time steps
        out, _ = self.lstm(x.squeeze(1))  # (N, 8, hidden)
        return self.head(out[:, -1])


if __name__ == "__main__":
    compare("LSTM row reader", RowReader, epochs=15, lr=0.1, argv=sys.argv[1:])
