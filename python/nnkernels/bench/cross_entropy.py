"""cross_entropy and linear_cross_entropy benchmark cases vs torch, with peak memory.

cross_entropy is memory-bound: GB/s counts the passes the fused kernel needs at least (forward +
backward: read the logits, write their gradient; forward alone: read them). linear_cross_entropy
is GEMM-bound (three GEMMs of 2 N H V flops each): GFLOP/s, and the point is its peak memory
against torch's unfused linear + cross_entropy."""

import torch
import torch.nn.functional as F

import nnkernels.functional as NF

from .harness import Case, one_pass, sampler


def _ce_case(n, c, device, mode, **kw):
    x = torch.randn(n, c, device=device)
    t = torch.randint(0, c, (n,), device=device)
    x.requires_grad_(mode == "fwd+bwd")

    def make(fn):
        return one_pass(lambda: fn(x, t, **kw), mode == "fwd+bwd", x)

    opts = "".join(f" {k}={v}" for k, v in kw.items())
    passes = 2 if mode == "fwd+bwd" else 1
    return Case(
        op="cross_entropy",
        name=f"{n}x{c}{opts} {mode}",
        dtype="float32",
        ours=make(NF.cross_entropy),
        torch=make(F.cross_entropy),
        bytes=passes * x.numel() * x.element_size(),
        memory=True,
    )


def _lce_case(n, h, v, device):
    x = torch.randn(n, h, device=device, requires_grad=True)
    w = (torch.randn(v, h, device=device) * h**-0.5).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)

    def unfused(x_, w_, t_):
        return F.cross_entropy(F.linear(x_, w_), t_)

    def make(fn):
        return lambda: torch.autograd.grad(fn(x, w, t), (x, w))

    return Case(
        op="linear_cross_entropy",
        name=f"{n}x{h} -> {v} fwd+bwd",
        dtype="float32",
        ours=make(NF.linear_cross_entropy),
        torch=make(unfused),
        flops=3 * 2.0 * n * h * v,
        memory=True,
    )


def cases(device: str, quick: bool):
    if quick:
        return [_ce_case(1024, 32000, device, "fwd+bwd")]
    return [
        _ce_case(4096, 32000, device, "fwd+bwd"),
        _ce_case(4096, 32000, device, "fwd"),
        _ce_case(4096, 32000, device, "fwd+bwd", label_smoothing=0.1),
        _ce_case(256, 10, device, "fwd+bwd"),  # the course MLP's loss
        _lce_case(4096, 1024, 32000, device),
    ]


# ------------------------------------------------------------------------- parity check
# build(dtype, device, small) -> (inputs, ours, theirs, k): python -m nnkernels check (check.py).


def _cross_entropy(dtype, device, small):
    r = sampler(5, dtype, device)
    n, c = (4, 5) if small else (64, 100)
    x = r(n, c, scale=3.0)
    t = torch.randint(0, c, (n,), generator=r.gen).to(device)
    kw = dict(label_smoothing=0.1)
    return [x], lambda x: NF.cross_entropy(x, t, **kw), lambda x: F.cross_entropy(x, t, **kw), c


def _linear_cross_entropy(dtype, device, small):
    r = sampler(6, dtype, device)
    n, h, v = (4, 3, 5) if small else (64, 32, 100)
    x, w = r(n, h), r(v, h)
    t = torch.randint(0, v, (n,), generator=r.gen).to(device)
    return (
        [x, w],
        lambda x, w: NF.linear_cross_entropy(x, w, t),
        lambda x, w: F.cross_entropy(F.linear(x, w), t),
        h * v,
    )


PARITY = {"cross_entropy": _cross_entropy, "linear_cross_entropy": _linear_cross_entropy}
