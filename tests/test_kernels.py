"""nnkernels.kernels: the raw forward kernels on numpy arrays and torch tensors, with alpha/beta,
given outputs, every stride pattern (negative numpy strides included) and the bias epilogue."""

import nnkernels.kernels as K
import numpy as np
import pytest
import torch


def _ref(a, b):
    return np.asarray(a, np.float64) @ np.asarray(b, np.float64)


def _tol(a, k):
    return 1e-9 if a.dtype == np.float64 else 4e-6 * max(1, k) ** 0.5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,N,Kd", [(1, 1, 1), (7, 17, 129), (64, 100, 300), (0, 4, 3), (3, 4, 0)])
def test_numpy_matmul(isa, dtype, M, N, Kd):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, Kd)).astype(dtype)
    b = rng.standard_normal((Kd, N)).astype(dtype)
    c = K.matmul(a, b)
    assert isinstance(c, np.ndarray) and c.dtype == dtype and c.shape == (M, N)
    np.testing.assert_allclose(c, _ref(a, b), rtol=_tol(a, Kd), atol=_tol(a, Kd))


def test_numpy_strides(isa):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((60, 80)).astype(np.float32)[::-2, ::3]  # negative row stride
    b = rng.standard_normal((50, 81)).astype(np.float32).T[::3, ::-2]  # transposed, reversed
    assert a.shape[1] == b.shape[0]
    np.testing.assert_allclose(K.matmul(a, b), _ref(a, b), rtol=1e-5, atol=1e-4)


def test_numpy_readonly_input():
    a = np.ones((3, 4), np.float32)
    a.flags.writeable = False
    np.testing.assert_allclose(K.matmul(a, np.ones((4, 2), np.float32)), np.full((3, 2), 4.0))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_alpha_beta_out(isa, lib):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((33, 70))
    b = rng.standard_normal((70, 21))
    c0 = rng.standard_normal((33, 21))
    want = 0.5 * _ref(a, b) - 2.0 * c0
    if lib == "torch":
        a, b, c = (torch.from_numpy(x) for x in (a, b, c0.copy()))
    else:
        c = c0.copy()
    got = K.matmul(a, b, c, alpha=0.5, beta=-2.0)
    assert got is c
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def test_beta_zero_ignores_nan_in_out(isa):
    out = torch.full((5, 6), float("nan"))
    K.matmul(torch.ones(5, 3), torch.ones(3, 6), out)
    assert torch.equal(out, torch.full((5, 6), 3.0))


def test_k_zero_scales_out(isa):
    out = torch.full((2, 3), 4.0)
    K.matmul(torch.empty(2, 0), torch.empty(0, 3), out, beta=0.5)
    assert torch.equal(out, torch.full((2, 3), 2.0))


def test_alpha_zero_does_not_read_inputs(isa):
    a = torch.full((2, 3), float("nan"))
    out = torch.ones(2, 4)
    K.matmul(a, torch.ones(3, 4), out, alpha=0.0, beta=1.0)
    assert torch.equal(out, torch.ones(2, 4))


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_strided_out(isa, layout):
    """C with a non-unit column stride goes through the edge-tile store for every tile."""
    a, b = torch.randn(37, 50), torch.randn(50, 41)
    if layout == "transposed":
        out = torch.empty(41, 37).mT
    else:
        out = torch.zeros(37, 82)[:, ::2]
    K.matmul(a, b, out)
    torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-4)


def test_batched_with_shared_operand(isa):
    a = torch.randn(5, 7, 9)
    b = torch.randn(9, 4)
    torch.testing.assert_close(K.matmul(a, b), a @ b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.matmul(b.mT, a.mT), b.mT @ a.mT, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_linear_kernel(isa, lib):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6, 19)).astype(np.float32)
    w = rng.standard_normal((23, 19)).astype(np.float32)
    b = rng.standard_normal(23).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64) + b
    if lib == "torch":
        x, w, b = (torch.from_numpy(t) for t in (x, w, b))
    got = np.asarray(K.linear(x, w, b))
    assert got.shape == (4, 6, 23)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_linear_kernel_out(lib):
    x, w, b = np.ones((2, 3, 4), np.float32), np.ones((5, 4), np.float32), np.ones(5, np.float32)
    out = np.zeros((2, 3, 5), np.float32)
    if lib == "torch":
        x, w, b, out = (torch.from_numpy(t) for t in (x, w, b, out))
    assert K.linear(x, w, b, out=out) is out
    np.testing.assert_array_equal(np.asarray(out), np.full((2, 3, 5), 5.0))
    bad = out.transpose(0, 1) if lib == "torch" else out.transpose(1, 0, 2)
    with pytest.raises(ValueError, match="out must have shape"):
        K.linear(x, w, b, out=bad)
    strided = (
        torch.zeros(2, 3, 10)[..., ::2]
        if lib == "torch"
        else np.zeros((2, 3, 10), np.float32)[..., ::2]
    )
    with pytest.raises(ValueError, match="out must be contiguous"):
        K.linear(x, w, b, out=strided)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_conv2d_kernel(lib):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 2)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    kw = dict(stride=(2, 1), padding=(1, 2, 0, 1), dilation=(1, 2), groups=2)
    want = torch.nn.functional.conv2d(
        torch.nn.functional.pad(torch.from_numpy(x).double(), (0, 1, 1, 2)),
        torch.from_numpy(w).double(),
        torch.from_numpy(b).double(),
        stride=(2, 1),
        dilation=(1, 2),
        groups=2,
    ).numpy()
    if lib == "torch":
        x, w, b = (torch.from_numpy(t) for t in (x, w, b))
    got = np.asarray(K.conv2d(x, w, b, **kw))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    same = np.asarray(K.conv2d(x, w, None, padding="same", groups=2))
    assert same.shape == (2, 6, 9, 8)
