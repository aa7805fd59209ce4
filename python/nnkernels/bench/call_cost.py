"""Per-call cost cases: every op at a shape so small that the time is the fixed cost of one call
(Python, argument checks, the autograd node, the hand-off to the kernel, allocation), ours and
torch's side by side. Small layers and the course's example models are dominated by it.

Each case is a forward without grad, a forward while autograd records (the graph is built, no
backward), or a whole step: forward, then backward into the parameters' .grad (what a training
loop runs). `python -m nnkernels bench --ops call_cost`, or benchmarks/bench_call_cost.py.
"""

import torch
import torch.nn.functional as F

import nnkernels
import nnkernels.functional as NF

from .harness import Case


def _no_grad(fn, *args):
    def call():
        with torch.no_grad():
            return fn(*args)

    return call


def _step(module, *args):
    """forward + backward into .grad (zeroed by set_to_none each time, as optimizers do)."""
    params = list(module.parameters())

    def call():
        for p in params:
            p.grad = None
        out = module(*args)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()

    return call


def _pair(torch_module, *args):
    """(ours, theirs): the same module's forward+backward, swapped and not."""
    ours = torch_module
    theirs = type(torch_module).__new__(type(torch_module))
    theirs.__dict__ = dict(torch_module.__dict__)  # same parameters, torch's own class
    nnkernels.swap_layers(ours)
    return _step(ours, *args), _step(theirs, *args)


def cases(device: str, quick: bool):
    dev = device
    out = []

    def add(name, ours, theirs, flops):
        out.append(
            Case(op="call_cost", name=name, dtype="float32", ours=ours, torch=theirs, flops=flops)
        )

    # Linear 16x32 -> 8: the reference point.
    x = torch.randn(16, 32, device=dev)
    w = torch.randn(8, 32, device=dev, requires_grad=True)
    b = torch.randn(8, device=dev, requires_grad=True)
    lin_flops = 2.0 * 16 * 32 * 8
    add(
        "linear 16x32->8 fwd, recording",
        lambda: NF.linear(x, w, b),
        lambda: F.linear(x, w, b),
        lin_flops,
    )
    w0, b0 = w.detach(), b.detach()  # no input requires grad: nothing to record
    add(
        "linear 16x32->8 fwd, no grad",
        lambda: NF.linear(x, w0, b0),
        lambda: F.linear(x, w0, b0),
        lin_flops,
    )
    ours, theirs = _pair(torch.nn.Linear(32, 8).to(dev), x)
    add("nn.Linear(32, 8) fwd+bwd", ours, theirs, 3 * lin_flops)
    if quick:
        return out

    # conv2d 2x4x8x8, 8 filters 3x3
    xc = torch.randn(2, 4, 8, 8, device=dev)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1).to(dev)
    conv_flops = 2.0 * 2 * 8 * 8 * 8 * 4 * 9
    wc, bc = conv.weight.detach(), conv.bias.detach()
    add(
        "conv2d 2x4x8x8 -> 8, 3x3 fwd, no grad",
        _no_grad(NF.conv2d, xc, wc, bc, 1, 1),
        _no_grad(F.conv2d, xc, wc, bc, 1, 1),
        conv_flops,
    )
    ours, theirs = _pair(conv, xc)
    add("nn.Conv2d(4, 8, 3) on 2x4x8x8 fwd+bwd", ours, theirs, 3 * conv_flops)

    # batch norm 2x8x4x4
    xb = torch.randn(2, 8, 4, 4, device=dev)
    bn = torch.nn.BatchNorm2d(8).to(dev)
    ours, theirs = _pair(bn, xb)
    add("nn.BatchNorm2d(8) on 2x8x4x4 train fwd+bwd", ours, theirs, 10.0 * xb.numel())
    rm, rv = torch.zeros(8, device=dev), torch.ones(8, device=dev)
    add(
        "batch_norm 2x8x4x4 eval fwd, no grad",
        _no_grad(NF.batch_norm, xb, rm, rv, bn.weight, bn.bias, False),
        _no_grad(F.batch_norm, xb, rm, rv, bn.weight, bn.bias, False),
        2.0 * xb.numel(),
    )

    # cross-entropy 16 x 10
    logits = torch.randn(16, 10, device=dev, requires_grad=True)
    t = torch.randint(0, 10, (16,), device=dev)

    def ce_step(fn):
        def call():
            logits.grad = None
            fn(logits, t).backward()

        return call

    add(
        "cross_entropy 16x10 fwd+bwd",
        ce_step(NF.cross_entropy),
        ce_step(F.cross_entropy),
        5.0 * logits.numel(),
    )
    add(
        "cross_entropy 16x10 fwd, no grad",
        _no_grad(NF.cross_entropy, logits, t),
        _no_grad(F.cross_entropy, logits, t),
        3.0 * logits.numel(),
    )

    # LSTMCell(16, 32), batch 4
    xl = torch.randn(4, 16, device=dev)
    cell = torch.nn.LSTMCell(16, 32).to(dev)
    cell_flops = 2.0 * 4 * 128 * (16 + 32)
    params = [p.detach() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]
    add(
        "lstm_cell 4x16 -> 32 fwd, no grad",
        _no_grad(NF.lstm_cell, xl, None, *params),
        _no_grad(torch.lstm_cell, xl, (torch.zeros(4, 32), torch.zeros(4, 32)), *params),
        cell_flops,
    )
    ours, theirs = _pair(cell, xl)
    add("nn.LSTMCell(16, 32) batch 4 fwd+bwd", ours, theirs, 3 * cell_flops)
    return out
