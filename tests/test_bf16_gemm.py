"""bfloat16 products on the CPU (cpu/gemm_bf16.cpp): matmul and linear with bfloat16 operands,
float32 accumulation, on every bfloat16 kernel this machine has (AMX, AVX512_BF16, and the
widening kernel that every other ISA runs), and under torch.autocast("cpu", bfloat16) computed by
those kernels, not handed back to torch.

Parity is the project's rule (assert_matches_reference): ours within 8x torch's own bfloat16 error
of the float64 reference computed from the same bfloat16 values."""

import nnkernels.functional as NF
import pytest
import torch
import torch.nn.functional as F
from conftest import BF16_KERNELS, assert_matches_reference
from nnkernels import _native


def _bf16(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).bfloat16()


def _layout(t, how):
    """t (2-D) as a contiguous, transposed (column-major) or strided (every other column) view."""
    if how == "transposed":
        return t.t().contiguous().t()
    if how == "strided":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


# size 1, primes, the 32-element block and k-pair edges, several K chunks (8 blocks of 32)
SHAPES = [
    (1, 1, 1),
    (7, 13, 5),
    (32, 32, 32),
    (33, 31, 65),
    (64, 64, 300),
    (3, 301, 2),
    (17, 600, 40),
    (600, 40, 70),
    (45, 64, 7),  # K a multiple of 32: a full panel read in place, the edge one packed
    (5, 640, 96),  # and W^T read in place as C^T = W . X^T when B is transposed
]


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("la", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("lb", ["contiguous", "transposed", "strided"])
def test_matmul_bf16(bf16_kernel, M, K, N, la, lb):
    a, b = _layout(_bf16(M, K), la), _layout(_bf16(K, N), lb)
    ours = NF.matmul(a, b)
    assert ours.dtype == torch.bfloat16
    assert_matches_reference(ours, a @ b, a.double() @ b.double(), k=K)


@pytest.mark.parametrize("M,K,N", [(5, 9, 3), (40, 70, 33), (5, 64, 40)])
@pytest.mark.parametrize("lb", ["contiguous", "transposed"])
def test_gemm_bf16_alpha_beta_bias(bf16_kernel, M, K, N, lb):
    """The binding's whole contract: out = alpha * a @ b + beta * out + bias, bfloat16 out (a
    transposed b at M < N and K = 64 runs as the transposed product, the bias per row there)."""
    a, b, bias = _bf16(M, K), _layout(_bf16(K, N), lb), _bf16(N)
    c0 = _bf16(M, N)
    out = c0.clone()
    _native.gemm(a, b, out, alpha=0.5, beta=-2.0, bias=bias)
    ref = 0.5 * (a.double() @ b.double()) - 2.0 * c0.double() + bias.double()
    theirs = torch.addmm(c0, a, b, beta=-2.0, alpha=0.5) + bias
    assert_matches_reference(out, theirs, ref, k=K)


def test_gemm_bf16_empty_dims(bf16_kernel):
    """K = 0: out = beta * out + bias; M = 0 or N = 0: nothing to write."""
    out = _bf16(3, 4)
    bias = _bf16(4)
    expect = (2.0 * out.float() + bias.float()).bfloat16()
    _native.gemm(_bf16(3, 0), _bf16(0, 4), out, beta=2.0, bias=bias)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    assert NF.matmul(_bf16(0, 5), _bf16(5, 3)).shape == (0, 3)
    assert NF.matmul(_bf16(4, 5), _bf16(5, 0)).shape == (4, 0)


def test_batched_matmul_bf16(bf16_kernel):
    a, b = _bf16(3, 1, 9, 17), _bf16(2, 17, 6)  # broadcast batch dims
    ours = NF.matmul(a, b)
    assert_matches_reference(ours, a @ b, a.double() @ b.double(), k=17)


@pytest.mark.parametrize("shape,out_features", [((1, 1), 1), ((7, 37), 29), ((2, 5, 64), 300)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_bf16_gradients(bf16_kernel, shape, out_features, bias):
    """bfloat16 input, weight and bias (what autocast gives linear): output and every gradient in
    bfloat16, each within the rule (the bias gradient sums over the batch in float32)."""
    x = _bf16(*shape)
    w = _bf16(out_features, shape[-1], scale=0.3)
    b = _bf16(out_features) if bias else None
    g = _bf16(*shape[:-1], out_features)
    rows = x.numel() // shape[-1]
    results = []
    for fn, dt in ((NF.linear, None), (F.linear, None), (F.linear, torch.float64)):
        leaves = [t.to(dt or t.dtype).requires_grad_() for t in (x, w, b) if t is not None]
        out = fn(*leaves) if bias else fn(leaves[0], leaves[1])
        grads = torch.autograd.grad(out, leaves, g.to(dt or g.dtype))
        results.append((out.detach(), grads))
    (o, go), (t, gt), (r, gr) = results
    assert o.dtype == torch.bfloat16
    assert_matches_reference(o, t, r, k=shape[-1], name="output")
    for name, a_, b_, c_, k in zip(
        ("input", "weight", "bias"), go, gt, gr, (out_features, rows, rows)
    ):
        assert_matches_reference(a_, b_, c_, k=k, name=f"grad {name}")


def test_linear_bf16_double_backward(bf16_kernel):
    """create_graph: the gradients from the differentiable bfloat16 ops (mm, sum_rows)."""
    x = _bf16(6, 5).requires_grad_()
    w = _bf16(4, 5).requires_grad_()
    b = _bf16(4).requires_grad_()
    results = []
    for fn in (NF.linear, F.linear):
        out = fn(x, w, b)
        (gx,) = torch.autograd.grad(out.float().pow(2).sum(), [x], create_graph=True)
        results.append(torch.autograd.grad(gx.float().sum(), [w, b]))
    for ours, theirs in zip(*results):
        assert ours.dtype == theirs.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("op", ["linear", "matmul"])
def test_autocast_runs_our_bf16_kernels(bf16_kernel, op, monkeypatch):
    """Under torch.autocast("cpu", bfloat16), linear and matmul cast their operands as autocast
    does (float32 -> bfloat16), compute on nnkernels' bfloat16 GEMM (torch's own ops are made to
    fail here) and return bfloat16; the float32 parameters get float32 gradients as torch's."""
    x = torch.randn(9, 33, requires_grad=True)
    w = torch.randn(17, 33, requires_grad=True)
    b = torch.randn(17, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = F.linear(x, w, b) if op == "linear" else torch.matmul(x, w.t())
    their_grads = torch.autograd.grad(theirs.float().sum(), [x, w])

    def refuse(*args, **kwargs):
        raise AssertionError("handed back to torch")

    monkeypatch.setattr(torch.nn.functional, "linear", refuse)
    monkeypatch.setattr(torch, "matmul", refuse)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = NF.linear(x, w, b) if op == "linear" else NF.matmul(x, w.t())
    monkeypatch.undo()
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(ours.float().sum(), [x, w])
    for g, t in zip(grads, their_grads):
        assert g.dtype == t.dtype == torch.float32
        torch.testing.assert_close(g, t, rtol=2e-2, atol=5e-2)


def test_autocast_float16_linear_on_float32_copies():
    """CPU autocast to float16: the kernels have no float16 GEMM, so linear computes on float32
    copies of autocast's float16 operands and returns float16, as torch's autocast does."""
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        ours, theirs = NF.linear(x, w), F.linear(x, w)
    assert ours.dtype == theirs.dtype == torch.float16
    ref = x.half().double() @ w.half().double().t()
    assert_matches_reference(ours, theirs, ref, k=8)


def test_bf16_mixed_dtypes_name_the_argument():
    a = _bf16(3, 4)
    with pytest.raises(TypeError, match="b has dtype"):
        NF.matmul(a, torch.randn(4, 2))
    with pytest.raises(TypeError, match="weight"):
        NF.linear(a, torch.randn(2, 4))
    with pytest.raises(TypeError, match="out"):
        _native.gemm(a, _bf16(4, 2), torch.empty(3, 2))


def test_bf16_kernel_names():
    assert _native.gemm_bf16_kernel_name() in BF16_KERNELS
    assert torch.bfloat16 in _native.supported_dtypes("cpu", "gemm")
    assert torch.bfloat16 not in _native.supported_dtypes("cpu")
    with pytest.raises(ValueError, match="unknown"):
        _native.set_gemm_bf16_kernel("bf16gemm_nonesuch")


@pytest.mark.parametrize(
    "M,K,N", [(8, 300, 2100), (1, 33, 70), (32, 64, 4100), (5, 7, 31), (97, 65, 40001)]
)
def test_skinny_rows_read_b_in_place(bf16_kernel, M, K, N):
    """One row panel of C and a row-major B (Linear's dx at a small batch): B is read in place,
    its pairs interleaved in registers, over groups of column panels (odd K: the last row alone;
    N past a panel, past a group of 64 panels; four row panels over a B larger than 4 L2s)."""
    a, b = _bf16(M, K), _bf16(K, N)
    ours = NF.matmul(a, b)
    assert_matches_reference(ours, a @ b, a.double() @ b.double(), k=K)
