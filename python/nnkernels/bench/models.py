"""Whole-model cases: a network built from torch.nn layers against the same network after
nnkernels.swap_layers (same weights, same inputs), side by side. A kernel that wins on its own
case can still lose inside a network (small feature maps, skinny GEMMs, the per-call cost), so
these are the measure of the package's speed.

    training step   zero_grad, forward, torch's cross-entropy on the output, backward, SGD step
    inference       eval mode, forward under torch.no_grad()

GFLOP/s are torch's flop count of the model (torch.utils.flop_counter) per step.

Models (defined here, torchvision's definitions, random init): ResNet-18 (7x7 stride-2 stem, max
pool, basic blocks, 1x1 stride-2 downsampling) on a batch of 8 64x64 images and of 2 224x224
images; an LSTM language model (Embedding(1000, 200), LSTM(200, 200, 2 layers), Linear(200, 1000))
on 35 steps of 20 sequences.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import nnkernels

from .harness import Case


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def resnet18(num_classes=1000):
    layers, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    )


class LanguageModel(nn.Module):
    """(T, B) token ids -> (T * B, vocab) logits."""

    def __init__(self, vocab=1000, hidden=200, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden, layers)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        y, _ = self.rnn(self.embed(tokens))
        return self.head(y.reshape(-1, y.shape[-1]))


def _flops(model, x, target, train):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            F.cross_entropy(model(x), target).backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _lstm_flops(T, B, hidden, layers, vocab, train):
    """torch's counter does not see inside nn.LSTM: its GEMMs, counted by hand."""
    rnn = layers * 2 * T * B * 4 * hidden * (2 * hidden)
    head = 2 * T * B * hidden * vocab
    return (rnn + head) * (3 if train else 1)


def _case(name, build, x, target, train, device, flops=None):
    torch.manual_seed(0)
    theirs = build().to(device)
    ours = copy.deepcopy(theirs)
    nnkernels.swap_layers(ours)  # in place: same Parameters' values, nnkernels layers
    if flops is None:
        flops = _flops(copy.deepcopy(theirs), x, target, train)

    def make(model):
        if not train:
            model.eval()

            def infer():
                with torch.no_grad():
                    return model(x)

            return infer
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), target).backward()
            opt.step()

        return step

    return Case(
        op="models",
        name=f"{name} {'train step' if train else 'inference'}",
        dtype="float32",
        ours=make(ours),
        torch=make(theirs),
        flops=flops,
    )


def cases(device: str, quick: bool):
    torch.manual_seed(0)
    out = []
    for batch, size in ((8, 64), (2, 224)):
        x = torch.randn(batch, 3, size, size, device=device)
        target = torch.randint(0, 1000, (batch,), device=device)
        for train in (True, False):
            if quick and (size == 224 or not train):
                continue
            out.append(
                _case(f"resnet18 {batch}x3x{size}x{size}", resnet18, x, target, train, device)
            )
    T, B = 35, 20
    tokens = torch.randint(0, 1000, (T, B), device=device)
    target = torch.randint(0, 1000, (T * B,), device=device)
    for train in (True, False) if not quick else (True,):
        flops = _lstm_flops(T, B, 200, 2, 1000, train)
        out.append(_case("LSTM LM T35 B20", LanguageModel, tokens, target, train, device, flops))
    return out
