"""batch_norm benchmark cases: nnkernels.nn.BatchNorm1d/2d vs torch's, training forward,
training forward+backward and eval forward. Memory-bound: GB/s counts the tensor passes the
fused kernels need at least (forward: read x, write y; backward: read dy and x, write dx), against
the measured copy bandwidth; peak extra memory per call beside."""

import torch
import torch.nn.functional as F

import nnkernels
import nnkernels.functional as NF

from .harness import Case, one_pass, sampler


def _case(shape, device, mode, channels_last=False):
    c = shape[1]
    x = torch.randn(*shape, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    cls = "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"
    ref = getattr(torch.nn, cls)(c).to(device)
    ours = getattr(nnkernels.nn, cls)(c).to(device)
    x.requires_grad_(mode == "fwd+bwd")
    g = torch.randn_like(x)
    for m in (ref, ours):
        m.train(mode != "eval")

    def make(m):
        return one_pass(lambda: m(x), mode == "fwd+bwd", (x, m.weight, m.bias), g)

    passes = {"fwd": 2, "eval": 2, "fwd+bwd": 5}[mode]
    name = "x".join(map(str, shape)) + (" channels_last" if channels_last else "") + f" {mode}"
    return Case(
        op="batch_norm",
        name=name,
        dtype="float32",
        ours=make(ours),
        torch=make(ref),
        bytes=passes * x.numel() * x.element_size(),
        memory=True,
    )


def cases(device: str, quick: bool):
    big = (32, 64, 56, 56)
    if quick:
        return [_case(big, device, "fwd+bwd"), _case(big, device, "eval")]
    return [
        _case(big, device, "fwd+bwd"),
        _case(big, device, "fwd"),
        _case(big, device, "eval"),
        _case(big, device, "fwd+bwd", channels_last=True),
        _case((64, 32, 24, 24), device, "fwd+bwd"),  # the course CNN's batch norm
        _case((256, 300), device, "fwd+bwd"),  # BatchNorm1d after a Linear
    ]


# ------------------------------------------------------------------------- parity check
# build(dtype, device, small) -> (inputs, ours, theirs, k): python -m nnkernels check (check.py).


def _batch_norm(dtype, device, small):
    r = sampler(4, dtype, device)
    n, c, h = (3, 2, 2) if small else (8, 6, 9)
    x = r(n, c, h, h, scale=2.0) + 3
    w, b = r(c), r(c)

    def run(fn):
        def f(x, w, b):
            rm, rv = x.new_zeros(c), x.new_ones(c)
            y = fn(x, rm, rv, w, b, training=True)
            return y, rm, rv

        return f

    return [x, w, b], run(NF.batch_norm), run(F.batch_norm), n * h * h


PARITY = {"batch_norm": _batch_norm}
