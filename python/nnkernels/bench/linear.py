"""Linear benchmark cases: nnkernels.functional.linear vs torch.nn.functional.linear, forward and
forward+backward (gradients of input, weight and bias)."""

import torch
import torch.nn.functional as F

import nnkernels.functional as NF

from .harness import Case, sampler


def _case(batch, in_f, out_f, device, backward):
    x = torch.randn(batch, in_f, device=device, requires_grad=backward)
    w = (torch.randn(out_f, in_f, device=device) / in_f**0.5).requires_grad_(backward)
    b = torch.randn(out_f, device=device, requires_grad=backward)
    g = torch.randn(batch, out_f, device=device)

    def make(fn):
        if not backward:
            return lambda: fn(x, w, b)

        def step():
            y = fn(x, w, b)
            return torch.autograd.grad(y, (x, w, b), g)

        return step

    mnk = 2.0 * batch * in_f * out_f
    return Case(
        op="linear",
        name=f"{batch}x{in_f}->{out_f} " + ("fwd+bwd" if backward else "fwd"),
        dtype="float32",
        ours=make(NF.linear),
        torch=make(torch.nn.functional.linear),
        flops=3 * mnk if backward else mnk,
    )


def cases(device: str, quick: bool):
    if quick:
        return [_case(256, 784, 300, device, True)]
    out = []
    for batch, in_f, out_f in [
        (256, 784, 300),
        (256, 300, 100),
        (256, 100, 10),
        (64, 784, 300),
        (1024, 784, 300),
        (32, 4096, 4096),
    ]:
        out += [_case(batch, in_f, out_f, device, False), _case(batch, in_f, out_f, device, True)]
    return out


# ------------------------------------------------------------------------- parity check
# build(dtype, device, small) -> (inputs, ours, theirs, k): python -m nnkernels check (check.py).


def _linear(dtype, device, small):
    r = sampler(2, dtype, device)
    m, i, o = (3, 4, 5) if small else (64, 100, 30)
    x, w = r(m, i), r(o, i)
    b = r(o)
    return [x, w, b], NF.linear, F.linear, i


PARITY = {"linear": _linear}
