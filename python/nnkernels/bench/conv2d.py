"""conv2d benchmark cases: nnkernels.functional.conv2d vs torch.nn.functional.conv2d (oneDNN on
CPU, cuDNN on CUDA), forward and forward+backward, on a ResNet/MNIST-like suite."""

import torch
import torch.nn.functional as F

import nnkernels.functional as NF

from .harness import Case, sampler

# name, N, C, H, W, K, kernel, stride, padding, input needs grad
SUITE = [
    ("resnet 3x3 64->64 56^2", 8, 64, 56, 56, 64, 3, 1, 1, True),
    ("resnet 3x3 128->128 28^2", 8, 128, 28, 28, 128, 3, 1, 1, True),
    ("resnet 1x1 s2 64->128 56^2", 8, 64, 56, 56, 128, 1, 2, 0, True),
    ("mnist conv1 1->64 28^2", 64, 1, 28, 28, 64, 3, 1, 0, False),  # images need no gradient
    ("mnist conv2 64->32 26^2", 64, 64, 26, 26, 32, 3, 1, 0, True),
]


def _case(spec, device, backward, dtype="float32"):
    name, N, C, H, W, K, k, stride, pad, need_dx = spec
    dt = getattr(torch, dtype)
    x = torch.randn(N, C, H, W, device=device, dtype=dt, requires_grad=backward and need_dx)
    w = (torch.randn(K, C, k, k, device=device) / (C * k * k) ** 0.5).to(dt)
    w.requires_grad_(backward)
    b = torch.randn(K, device=device, dtype=dt, requires_grad=backward)
    P, Q = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    g = torch.randn(N, K, P, Q, device=device, dtype=dt)
    leaves = tuple(t for t in (x, w, b) if t.requires_grad)

    def make(fn):
        if not backward:
            return lambda: fn(x, w, b, stride=stride, padding=pad)
        return lambda: torch.autograd.grad(fn(x, w, b, stride=stride, padding=pad), leaves, g)

    fwd = 2.0 * N * K * C * k * k * P * Q
    passes = 1 + (2 if need_dx else 1) if backward else 1
    return Case(
        op="conv2d",
        name=f"{name} b{N} " + ("fwd+bwd" if backward else "fwd"),
        dtype=dtype,
        ours=make(NF.conv2d),
        torch=make(torch.nn.functional.conv2d),
        flops=fwd * passes,
    )


def cases(device: str, quick: bool, dtype: str = "float32"):
    """dtype "bfloat16": the same suite on bfloat16 tensors (CPU: the bfloat16 GEMM passes)."""
    if dtype != "float32" and device != "cpu":
        return []
    if quick:
        return [_case(SUITE[1], device, True, dtype), _case(SUITE[3], device, True, dtype)]
    return [_case(s, device, bwd, dtype) for s in SUITE for bwd in (False, True)]


# ------------------------------------------------------------------------- parity check
# build(dtype, device, small) -> (inputs, ours, theirs, k): python -m nnkernels check (check.py).


def _conv2d(dtype, device, small):
    r = sampler(3, dtype, device)
    n, c, h, k = (1, 2, 5, 3) if small else (4, 3, 17, 8)
    x = r(n, c, h, h)
    w = r(k, c, 3, 3)
    b = r(k)
    kw = dict(stride=2, padding=1)
    return (
        [x, w, b],
        lambda x, w, b: NF.conv2d(x, w, b, **kw),
        lambda x, w, b: F.conv2d(x, w, b, **kw),
        c * 9 * n * h * h,
    )


PARITY = {"conv2d": _conv2d}
