"""conv2d on bfloat16 tensors on the CPU (cpu/conv2d.cpp, "bfloat16"): the three passes on the
bfloat16 GEMM with float32 accumulation, on every bfloat16 kernel this machine has, and under
torch.autocast("cpu", bfloat16) computed by nnkernels, not handed back to torch.

The paths, each hit below: pixel runs (C/groups a multiple of 32: windows of padded
channels-last copies read in place by the GEMM, NCHW image by image at 256+ pixels or merged
through a buffer, channels_last merged in place); im2col (other channel counts, and layers whose
maps have fewer pixels than half the output channels); the data gradient as the flipped forward
(stride 1: a view of the weight for one group, a transposed copy for several) or col2im (strided);
depthwise layers on float32 copies; a single-chunk weight gradient stored straight to bfloat16.
Parity is the project's rule (assert_matches_reference) against float64 from the same bfloat16
values."""

import nnkernels.functional as NF
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference
from nnkernels import _native

# (input shape, weight shape, conv arguments)
CASES = [
    ((2, 32, 9, 9), (32, 32, 3, 3), dict(padding=1)),  # runs, merged, flipped view
    ((2, 32, 20, 20), (64, 32, 3, 3), dict(padding=1)),  # runs, NCHW image by image
    ((3, 64, 7, 11), (32, 64, 3, 2), dict(stride=2, padding=(1, 0))),  # runs, col2im data
    ((1, 64, 6, 6), (64, 32, 3, 3), dict(groups=2, dilation=2, padding=2)),  # runs per group
    ((2, 96, 5, 7), (64, 96, 3, 3), dict(padding=(2, 0))),  # three 32-channel runs per tap
    ((3, 32, 17, 17), (64, 32, 1, 1), dict(stride=2)),
    ((2, 32, 8, 8), (32, 32, 3, 3), dict(padding=0)),  # flipped forward with padding (2, 2)
    ((2, 32, 4, 4), (96, 32, 3, 3), dict(padding=2)),  # the flip crops: padding 0 there
    ((9, 32, 2, 2), (64, 32, 3, 3), dict(padding=1)),
    ((1, 64, 2, 2), (256, 64, 3, 3), dict(padding=1)),  # weight-heavy: im2col forward
    ((2, 8, 9, 9), (16, 8, 3, 3), dict(padding=1)),  # im2col, flipped transposed copy? (Cg 8)
    ((2, 32, 6, 6), (32, 16, 3, 3), dict(groups=2, padding=1)),  # flipped transposed copy
    ((3, 7, 9, 11), (5, 7, 3, 2), dict(stride=2, padding=(1, 0))),  # im2col, col2im, primes
    ((3, 5, 7, 11), (7, 5, 3, 2), dict(stride=2, padding=(1, 0))),  # C R S 30 < one k block
    ((4, 1, 8, 8), (16, 1, 3, 3), dict(padding=1)),  # a C = 1 first layer
    ((2, 3, 20, 20), (4, 3, 7, 7), dict(stride=2, padding=3)),  # the ResNet stem
    ((4, 64, 4, 4), (32, 64, 1, 1), {}),
    ((1, 1, 5, 5), (1, 1, 1, 1), {}),  # size 1
    ((2, 8, 5, 5), (8, 1, 3, 3), dict(groups=8, padding=1)),  # depthwise: float32 copies
    ((2, 8, 5, 5), (16, 1, 3, 3), dict(groups=8, stride=2, padding=1)),  # depthwise x2
]


def _ids(case):
    x, w, kw = case
    return f"{'x'.join(map(str, x))}-{'x'.join(map(str, w))}-" + "-".join(
        f"{k}{v}" for k, v in kw.items()
    )


def _run(fn, x, w, b, g, kw):
    """Output and the gradients of x, w, b (leaves made from the given tensors)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(*leaves[:2], leaves[2] if b is not None else None, **kw)
    grads = torch.autograd.grad(y, leaves, g.to(y.dtype))
    return y.detach(), grads


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv2d_bf16_passes(bf16_kernel, case, layout):
    xs, ws, kw = case
    x, w, b = torch.randn(xs).bfloat16(), (torch.randn(ws) * 0.3).bfloat16(), torch.randn(ws[0])
    b = b.bfloat16()
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    y_shape = F.conv2d(x.float(), w.float(), **kw).shape
    g = torch.randn(y_shape).bfloat16()
    (o, go), (t, gt), (r, gr) = (
        _run(NF.conv2d, x, w, b, g, kw),
        _run(F.conv2d, x, w, b, g, kw),
        _run(F.conv2d, x.double(), w.double(), b.double(), g.double(), kw),
    )
    assert o.dtype == torch.bfloat16 and all(t_.dtype == torch.bfloat16 for t_ in go)
    if layout == "channels_last" and xs[1] > 1:
        assert o.is_contiguous(memory_format=torch.channels_last)
    pixels = xs[0] * y_shape[2] * y_shape[3]
    taps = ws[1] * ws[2] * ws[3]
    assert_matches_reference(o, t, r, k=taps, name="output")
    for name, a_, b_, c_, k in zip(
        ("input", "weight", "bias"), go, gt, gr, (ws[0] * ws[2] * ws[3], pixels, pixels)
    ):
        assert_matches_reference(a_, b_, c_, k=k, name=f"grad {name}")


def test_conv2d_bf16_strided_views(bf16_kernel):
    """Non-contiguous input (every other row and channel) and a non-contiguous weight."""
    x = torch.randn(2, 64, 18, 9).bfloat16()[:, ::2, ::2]
    w = torch.randn(32, 32, 3, 5).bfloat16().transpose(2, 3)
    ours, theirs = NF.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1)
    assert_matches_reference(ours, theirs, F.conv2d(x.double(), w.double(), padding=1), k=32 * 15)


def test_conv2d_bf16_empty(bf16_kernel):
    """Zero images, zero output channels, and zero input channels (output = bias, grads 0)."""
    assert NF.conv2d(
        torch.randn(0, 32, 5, 5).bfloat16(), torch.randn(8, 32, 3, 3).bfloat16()
    ).shape == (0, 8, 3, 3)
    assert NF.conv2d(
        torch.randn(2, 32, 5, 5).bfloat16(), torch.randn(0, 32, 3, 3).bfloat16()
    ).shape == (2, 0, 3, 3)
    x = torch.randn(2, 0, 5, 5).bfloat16().requires_grad_()
    w = torch.randn(4, 0, 3, 3).bfloat16().requires_grad_()
    b = torch.randn(4).bfloat16().requires_grad_()
    y = NF.conv2d(x, w, b)
    torch.testing.assert_close(y, b[None, :, None, None].expand(2, 4, 3, 3).detach())
    y.float().sum().backward()
    assert b.grad.tolist() == [18.0] * 4


def test_conv2d_autocast_runs_our_kernels(bf16_kernel, monkeypatch):
    """Under torch.autocast("cpu", bfloat16) conv2d casts its operands as autocast does, computes
    on nnkernels' bfloat16 passes (torch's conv ops are made to fail) and returns bfloat16; the
    float32 parameters get float32 gradients as torch's do."""
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    w = torch.randn(32, 32, 3, 3, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = F.conv2d(x, w, b, padding=1)
    their_grads = torch.autograd.grad(theirs.float().sum(), [x, w, b])

    def refuse(*args, **kwargs):
        raise AssertionError("handed back to torch")

    monkeypatch.setattr(torch.nn.functional, "conv2d", refuse)
    monkeypatch.setattr(torch, "conv2d", refuse)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = NF.conv2d(x, w, b, padding=1)
    grads = torch.autograd.grad(ours.float().sum(), [x, w, b])
    monkeypatch.undo()
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=1e-1)
    for g, t in zip(grads, their_grads):
        assert g.dtype == t.dtype == torch.float32
        torch.testing.assert_close(g, t, rtol=2e-2, atol=5e-1)


def test_conv2d_bf16_sum_channels():
    """The bias gradient alone (weight frozen) in bfloat16: sum_channels on both layouts."""
    for dy in (
        torch.randn(3, 5, 7, 9).bfloat16(),
        torch.randn(3, 5, 7, 9).bfloat16().to(memory_format=torch.channels_last),
    ):
        out = torch.empty(5, dtype=torch.bfloat16)
        _native.sum_channels(dy, out)
        ref = dy.double().sum((0, 2, 3))
        assert_matches_reference(out, dy.float().sum((0, 2, 3)).bfloat16(), ref, k=3 * 63)


def test_conv2d_float16_on_float32_copies():
    """float16 (no float16 kernels): float32 copies, float16 result, as torch's."""
    x, w = torch.randn(2, 4, 6, 6).half(), torch.randn(3, 4, 3, 3).half()
    ours = NF.conv2d(x, w, padding=1)
    assert ours.dtype == torch.float16
    ref = F.conv2d(x.double(), w.double(), padding=1)
    assert_matches_reference(ours, F.conv2d(x, w, padding=1), ref, k=36)
