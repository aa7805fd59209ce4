"""Bad input raises a clear Python exception naming the argument, before any kernel runs."""

import nnkernels
import nnkernels.functional as NF
import nnkernels.kernels as K
import numpy as np
import pytest
import torch
from nnkernels import _C


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


# ------------------------------------------------------------------------------ functional.matmul


def test_matmul_bad_input():
    a = torch.randn(3, 4)
    _raises(TypeError, "a must be a torch.Tensor", NF.matmul, np.ones((3, 4)), a)
    _raises(TypeError, "b must be a torch.Tensor", NF.matmul, a, [[1.0]])
    _raises(
        TypeError,
        "a must be a floating-point tensor, got dtype int64",
        NF.matmul,
        torch.ones(3, 4, dtype=torch.long),
        a.mT,
    )
    _raises(TypeError, "dtype bool", NF.matmul, torch.ones(3, 4, dtype=torch.bool), a.mT)
    _raises(
        TypeError,
        "b has dtype float64 but a has dtype float32",
        NF.matmul,
        a,
        torch.randn(4, 2, dtype=torch.float64),
    )
    _raises(ValueError, r"inner dimensions 4 and 5 differ", NF.matmul, a, torch.randn(5, 2))
    _raises(ValueError, "at least 1-D", NF.matmul, torch.tensor(2.0), a)
    _raises(ValueError, "do not broadcast", NF.matmul, torch.randn(2, 3, 4), torch.randn(3, 4, 5))
    assert (
        NF.matmul(a.half(), a.mT.half()).dtype == torch.float16
    )  # float32 math (test_low_precision)
    _raises(
        NotImplementedError, "complex64", NF.matmul, a.to(torch.complex64), a.mT.to(torch.complex64)
    )
    _raises(
        ValueError, "b is on meta but a is on cpu", NF.matmul, a, torch.empty(4, 2, device="meta")
    )
    _raises(
        NotImplementedError,
        "device 'meta'",
        NF.matmul,
        torch.empty(3, 4, device="meta"),
        torch.empty(4, 2, device="meta"),
    )


def test_linear_bad_input():
    x, w, b = torch.randn(8, 5), torch.randn(3, 5), torch.randn(3)
    _raises(
        ValueError,
        r"input has 4 features .* weight \(3, 5\) expects 5",
        NF.linear,
        torch.randn(8, 4),
        w,
        b,
    )
    _raises(ValueError, r"bias must have shape \(3,\)", NF.linear, x, w, torch.randn(4))
    _raises(ValueError, r"bias must have shape \(3,\)", NF.linear, x, w, torch.randn(1, 3))
    _raises(TypeError, "bias has dtype float64", NF.linear, x, w, b.double())
    _raises(TypeError, "weight has dtype int32", NF.linear, x, w.int(), b)
    _raises(TypeError, "input must be a floating-point tensor", NF.linear, x.long(), w, b)
    _raises(ValueError, "weight must be 2-D", NF.linear, x, w[None], b)
    _raises(NotImplementedError, "1-D weight", NF.linear, x, w[0], None)
    _raises(ValueError, "at least 1-D", NF.linear, torch.tensor(1.0), w, b)
    _raises(TypeError, "bias must be a torch.Tensor", NF.linear, x, w, [0.0, 0.0, 0.0])
    _raises(ValueError, "weight is on meta", NF.linear, x, torch.empty(3, 5, device="meta"), b)


def test_module_bad_input():
    m = nnkernels.nn.Linear(5, 3)
    _raises(ValueError, "input has 4 features", m, torch.randn(2, 4))
    _raises(
        TypeError,
        "weight has dtype float32 but input has dtype float64",
        m,
        torch.randn(2, 5, dtype=torch.float64),
    )


# ------------------------------------------------------------------------------------- kernels


def test_kernels_bad_input():
    a, b = np.ones((3, 4), np.float32), np.ones((4, 2), np.float32)
    _raises(TypeError, "mix of numpy arrays and torch tensors", K.matmul, a, torch.ones(4, 2))
    _raises(
        TypeError, "a must be a numpy.ndarray or a torch.Tensor, got list", K.matmul, [[1.0]], b
    )
    _raises(
        TypeError,
        "a must be a floating-point tensor, got dtype int64",
        K.matmul,
        np.ones((3, 4), np.int64),
        b,
    )
    _raises(
        TypeError, "b has dtype float64 but a has dtype float32", K.matmul, a, b.astype(np.float64)
    )
    _raises(ValueError, "inner dimensions 4 and 5 differ", K.matmul, a, np.ones((5, 2), np.float32))
    _raises(
        ValueError,
        r"out must have shape \(3, 2\), got \(2, 3\)",
        K.matmul,
        a,
        b,
        np.empty((2, 3), np.float32),
    )
    _raises(
        ValueError,
        "a must be 2 or 3-D",
        K.matmul,
        np.ones((1, 1, 3, 4), np.float32),
        b,
        np.empty((3, 2), np.float32),
    )
    _raises(ValueError, "beta != 0 reads out", K.matmul, a, b, beta=1.0)
    _raises(NotImplementedError, "float16", K.matmul, a.astype(np.float16), b.astype(np.float16))
    _raises(
        ValueError,
        "a has batch size 2 but out has 3",
        K.matmul,
        np.ones((2, 3, 4), np.float32),
        b,
        np.empty((3, 3, 2), np.float32),
    )


def test_kernels_bad_out():
    a, b = torch.ones(3, 4), torch.ones(4, 3)
    _raises(
        ValueError, "out has overlapping memory", K.matmul, a, b, torch.zeros(1, 3).expand(3, 3)
    )
    buf = torch.zeros(3, 4)
    _raises(ValueError, "out must not share memory with a", K.matmul, buf, b, buf[:, :3])
    ro = np.zeros((3, 3), np.float32)
    ro.flags.writeable = False
    _raises((ValueError, BufferError), "read-only|readonly", K.matmul, a.numpy(), b.numpy(), ro)
    _raises(ValueError, r"bias must have shape \(3,\)", K.linear, a, b.mT, torch.ones(4))


def test_native_layer_rejects_non_capsules():
    _raises(
        TypeError, r"a must be a torch.Tensor \(or a DLPack capsule\), got int", _C.gemm, 1, 2, 3
    )
    _raises(ValueError, "num_threads must be >= 1", _C.set_num_threads, 0)
    _raises(ValueError, "unknown ISA", _C.set_isa, "sse9")


def test_set_num_threads_validates():
    _raises(ValueError, "positive int", nnkernels.set_num_threads, 0)
    _raises(ValueError, "positive int", nnkernels.set_num_threads, 1.5)
    _raises(ValueError, "positive int", nnkernels.set_num_threads, True)
