"""Calls into the native extension: DLPack conversion, thread-count sync, CUDA stream.

Every layer above (autograd Functions, kernels) reaches the C++ kernels only through here, in
destination-passing style: the caller allocates `out`.
"""

import torch
from torch.utils.dlpack import to_dlpack

from . import _C

_user_threads = None  # set by set_num_threads(); None: follow torch.get_num_threads()
_synced_threads = None


def set_num_threads(n: int) -> None:
    """Use `n` threads in nnkernels' CPU kernels (by default they follow torch.get_num_threads())."""
    global _user_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive int, got {n!r}")
    _user_threads = n
    sync_threads()


def get_num_threads() -> int:
    """Threads nnkernels' CPU kernels use."""
    return _user_threads if _user_threads is not None else torch.get_num_threads()


def sync_threads() -> None:
    global _synced_threads
    n = get_num_threads()
    if n != _synced_threads:
        _C.set_num_threads(n)
        _synced_threads = n


def to_dl(x, name="tensor"):
    """A DLPack capsule of a torch tensor or a numpy array (borrowed, not copied)."""
    if type(x) is torch.Tensor:  # the common case first: no attribute probing
        return to_dlpack(x)
    if isinstance(x, torch.Tensor):
        return to_dlpack(x)
    if hasattr(x, "__dlpack__") and hasattr(x, "__array_interface__"):  # numpy
        try:
            return x.__dlpack__(max_version=(1, 0))  # versioned: can flag read-only inputs
        except TypeError:
            return x.__dlpack__()  # numpy < 2.1
        except BufferError as e:
            raise ValueError(f"{name}: numpy array cannot be passed to the kernels ({e})") from None
    raise TypeError(f"{name} must be a torch.Tensor or a numpy.ndarray, got {type(x).__name__}")


def _stream(x) -> int:
    if isinstance(x, torch.Tensor) and x.is_cuda:
        return torch.cuda.current_stream(x.device).cuda_stream
    return 0


def gemm(a, b, out, alpha=1.0, beta=0.0, bias=None, trans_a=False, trans_b=False):
    """out = alpha * op(a) @ op(b) + beta * out (+ bias per column); op(x) is x with its last two
    dims swapped when trans_x (a strided view, no copy). 2-D, or batched 3-D (a 2-D operand is
    shared across the batch). Any strides."""
    sync_threads()
    _C.gemm(
        to_dl(a, "a"),
        to_dl(b, "b"),
        to_dl(out, "out"),
        alpha,
        beta,
        None if bias is None else to_dl(bias, "bias"),
        _stream(out),
        trans_a,
        trans_b,
    )
    return out


def sum_channels(x, out):
    """out[c] = sum over n, h, w of x[n, c, h, w] for a 4-D x whose (H, W) dims flatten."""
    sync_threads()
    _C.sum_channels(to_dl(x, "x"), to_dl(out, "out"), _stream(out))
    return out


def sum_rows(x, out):
    """out[j] = sum_i x[i, j] for a 2-D x."""
    sync_threads()
    _C.sum_rows(to_dl(x, "x"), to_dl(out, "out"), _stream(out))
    return out


def lstm_forward(x, w_ih, w_hh, bias, h0, c0, y, gates, c, reverse=False):
    """One LSTM layer in one direction over x (T, B, I): y (T, B, H) = h_t, gates (T, B, 4H) = the
    activations (kept for lstm_backward), c (T, B, H) = c_t. bias = b_ih + b_hh or None."""
    sync_threads()
    _C.lstm_forward(
        to_dl(x, "input"),
        to_dl(w_ih, "w_ih"),
        to_dl(w_hh, "w_hh"),
        None if bias is None else to_dl(bias, "bias"),
        to_dl(h0, "h0"),
        to_dl(c0, "c0"),
        to_dl(y, "output"),
        to_dl(gates, "gates"),
        to_dl(c, "cell_states"),
        reverse,
        _stream(y),
    )


def lstm_backward(
    x, w_ih, w_hh, h0, c0, y, gates, c, dy, dh, dc, dx, dw_ih, dw_hh, dbias, reverse, accumulate
):
    """Backward through time of lstm_forward's call. dh, dc: d loss / d h_n, c_n in, d loss /
    d h0, c0 out. dy, dx, dw_ih, dw_hh, dbias may be None; dx is added to when accumulate.
    Overwrites gates."""
    sync_threads()

    def opt(t, name):
        return None if t is None else to_dl(t, name)

    _C.lstm_backward(
        to_dl(x, "input"),
        to_dl(w_ih, "w_ih"),
        to_dl(w_hh, "w_hh"),
        to_dl(h0, "h0"),
        to_dl(c0, "c0"),
        to_dl(y, "output"),
        to_dl(gates, "gates"),
        to_dl(c, "cell_states"),
        opt(dy, "grad_output"),
        to_dl(dh, "grad_h"),
        to_dl(dc, "grad_c"),
        opt(dx, "grad_input"),
        opt(dw_ih, "grad_w_ih"),
        opt(dw_hh, "grad_w_hh"),
        opt(dbias, "grad_bias"),
        reverse,
        accumulate,
        _stream(y),
    )
