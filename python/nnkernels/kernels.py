"""The raw forward kernels, on numpy arrays or torch tensors, without autograd.

    import numpy as np, nnkernels.kernels as K
    c = K.matmul(np.ones((3, 4), np.float32), np.ones((4, 5), np.float32))

Inputs may be strided (transposed views run without copies); outputs are allocated here unless
`out` is given. Arguments are checked by the native layer (names a, b, out, bias); numpy arrays
reach it as DLPack capsules.
"""

import math

import torch

from . import _native as N

__all__ = ["conv2d", "linear", "matmul"]


def _is_numpy(x) -> bool:
    return type(x).__module__ == "numpy" and hasattr(x, "__array_interface__")


def _kind(args):
    """'torch' or 'numpy' for the arrays in args (None entries skipped); no mixing."""
    kinds = set()
    for name, x in args:
        if x is None:
            continue
        if isinstance(x, torch.Tensor):
            kinds.add("torch")
        elif _is_numpy(x):
            kinds.add("numpy")
        else:
            raise TypeError(
                f"{name} must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__}"
            )
    if len(kinds) > 1:
        raise TypeError("mix of numpy arrays and torch tensors; pass one kind")
    return kinds.pop() if kinds else "torch"


def _arg(x, name):
    """What the kernels take: a torch tensor as it is, a numpy array as a DLPack capsule
    (versioned where numpy supports it, so read-only arrays are refused as outputs)."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    try:
        return x.__dlpack__(max_version=(1, 0))
    except TypeError:  # numpy < 2.1
        return x.__dlpack__()
    except BufferError as e:
        raise ValueError(f"{name}: numpy array cannot be passed to the kernels ({e})") from None


def _empty(kind, like, shape):
    if kind == "torch":
        return like.new_empty(shape)
    import numpy as np

    return np.empty(shape, dtype=like.dtype)


def _ndim(x):
    return len(x.shape)


def matmul(a, b, out=None, *, alpha=1.0, beta=0.0):
    """out = alpha * a @ b + beta * out.

    a (M, K) or (B, M, K); b (K, N) or (B, K, N); a 2-D operand next to a 3-D one is shared by
    every batch item. float32 or float64 (float32 on CUDA). beta != 0 needs `out`.
    """
    kind = _kind([("a", a), ("b", b), ("out", out)])
    if out is None:
        if beta != 0:
            raise ValueError("matmul: beta != 0 reads out, so out must be given")
        if _ndim(a) not in (2, 3) or _ndim(b) not in (2, 3):
            raise ValueError(
                f"matmul: a and b must be 2-D or 3-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
            )
        shape = (a.shape[-2], b.shape[-1])
        if _ndim(a) == 3 or _ndim(b) == 3:
            shape = ((a if _ndim(a) == 3 else b).shape[0],) + shape
        out = _empty(kind, a, shape)
    N.gemm(_arg(a, "a"), _arg(b, "b"), _arg(out, "out"), alpha, beta)
    return out


def linear(input, weight, bias=None, out=None):
    """out = input @ weight^T + bias for input (*, in), weight (out_features, in), bias
    (out_features,) or None; returns (*, out_features)."""
    kind = _kind([("input", input), ("weight", weight), ("bias", bias), ("out", out)])
    if _ndim(input) < 1 or _ndim(weight) != 2:
        raise ValueError(
            f"linear: input must be (*, in_features) and weight (out_features, in_features), got "
            f"shapes {tuple(input.shape)} and {tuple(weight.shape)}"
        )
    lead = tuple(input.shape[:-1])
    x2 = input.reshape(math.prod(lead), input.shape[-1])
    rows, n = x2.shape[0], weight.shape[0]
    if out is None:
        o2 = _empty(kind, input, (rows, n))
    else:
        if tuple(out.shape) != (*lead, n):
            raise ValueError(f"linear: out must have shape {(*lead, n)}, got {tuple(out.shape)}")
        o2 = out
        if len(lead) != 1:  # folding the leading dims must be a view, or the result is lost
            contiguous = out.is_contiguous() if kind == "torch" else out.flags.c_contiguous
            if not contiguous:
                raise ValueError(
                    "linear: out must be contiguous when input has several leading dims"
                )
            o2 = out.reshape(rows, n)
    N.gemm(
        _arg(x2, "input"),
        _arg(weight, "weight"),
        _arg(o2, "out"),
        bias=_arg(bias, "bias"),
        trans_b=True,
    )
    return o2.reshape(*lead, n) if out is None else out


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, out=None):
    """out = conv2d(input, weight) + bias for input (N, C, H, W), weight (K, C/groups, R, S),
    bias (K,) or None. stride, dilation: int or (h, w); padding: int, (h, w), (top, bottom, left,
    right), 'valid' or 'same' (zeros). Returns out (N, K, P, Q)."""
    from .ops.conv2d import pair as _pair

    kind = _kind([("input", input), ("weight", weight), ("bias", bias), ("out", out)])
    if _ndim(input) != 4 or _ndim(weight) != 4:
        raise ValueError(
            f"conv2d: input must be (N, C, H, W) and weight (K, C/groups, R, S), got shapes "
            f"{tuple(input.shape)} and {tuple(weight.shape)}"
        )
    sh, sw = _pair(stride, "stride", 1)
    dh, dw = _pair(dilation, "dilation", 1)
    r, s = weight.shape[2], weight.shape[3]
    eh, ew = dh * (r - 1) + 1, dw * (s - 1) + 1
    if padding == "valid":
        pad = (0, 0, 0, 0)
    elif padding == "same":
        pad = ((eh - 1) // 2, eh - 1 - (eh - 1) // 2, (ew - 1) // 2, ew - 1 - (ew - 1) // 2)
    elif isinstance(padding, (tuple, list)) and len(padding) == 4:
        pad = tuple(padding)
    else:
        ph, pw = _pair(padding, "padding", 0)
        pad = (ph, ph, pw, pw)
    n, _, h, w = input.shape
    p = (h + pad[0] + pad[1] - eh) // sh + 1
    q = (w + pad[2] + pad[3] - ew) // sw + 1
    if kind == "torch":
        weight = weight.contiguous()
    else:
        import numpy as np

        weight = np.ascontiguousarray(weight)
    if out is None:
        out = _empty(kind, input, (n, weight.shape[0], max(p, 0), max(q, 0)))
    N.conv2d_forward(
        _arg(input, "input"),
        _arg(weight, "weight"),
        _arg(bias, "bias"),
        _arg(out, "out"),
        (sh, sw),
        pad,
        (dh, dw),
        groups,
    )
    return out
