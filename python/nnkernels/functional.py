"""torch.nn.functional twins backed by nnkernels' kernels. Same signatures, same results (within
torch's own rounding), gradients through each op's one torch.autograd.Function (nnkernels/ops).

This layer only adapts torch's signatures: defaults, legacy argument forms, torch.autocast, and a
clear TypeError when an argument that must be a tensor is not one. Shapes, dtypes and devices are
checked by the kernels' bindings (or by the op's argument rules), which name the argument.
"""

import torch

from . import _native
from .ops import batch_norm as _bn
from .ops import conv2d as _conv
from .ops import cross_entropy as _ce
from .ops import lstm as _lstm
from .ops import matmul as _mm

__all__ = [
    "batch_norm",
    "conv2d",
    "cross_entropy",
    "linear",
    "linear_cross_entropy",
    "lstm",
    "lstm_cell",
    "matmul",
]

_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_on(x) -> bool:
    """Whether torch.autocast is active for x's device. Under autocast torch computes matmul,
    linear, conv2d and the LSTMs in float16 / bfloat16. On the CPU, matmul, linear and conv2d
    then compute on the operands autocast would give them (bfloat16 on the bfloat16 GEMM,
    float16 on float32 copies); the LSTMs compute in float32 and return the dtypes torch's
    autocast returns. On CUDA, whose kernels are float32 only, these ops return torch's own
    result rather than a float32 one (a silently different dtype)."""
    if not _any_autocast():
        return False  # the common case: one call
    if not isinstance(x, torch.Tensor) or x.device.type not in ("cpu", "cuda"):
        return False  # the checks that follow name the argument or the device
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()


_LOW = frozenset((torch.float16, torch.bfloat16))
if hasattr(torch, "get_autocast_dtype"):
    _autocast_dtype = torch.get_autocast_dtype
else:  # torch < 2.4

    def _autocast_dtype(device):
        return torch.get_autocast_cpu_dtype() if device == "cpu" else torch.get_autocast_gpu_dtype()


def _autocast_gemm_args(*tensors):
    """The operands of a matmul-like op as torch.autocast gives them on the CPU: every floating
    tensor but float64 cast to the autocast dtype (torch's lower_precision_fp policy), or None on
    CUDA, whose kernels have no float16 / bfloat16 GEMM (the op then returns torch's result)."""
    first = tensors[0]
    if first.device.type != "cpu":
        return None
    low = _autocast_dtype("cpu")

    def cast(t):
        if t is None or not t.dtype.is_floating_point or t.dtype in (low, torch.float64):
            return t
        return t.to(low)

    return tuple(cast(t) for t in tensors)


# (device type, ops) -> the dtypes the kernels compute there: read once at import, so that
# torch.compile never traces the extension call
_KERNEL_DTYPES = {
    (dev, ops): tuple(_native.supported_dtypes(dev, ops))
    for dev in ("cpu", "cuda")
    for ops in ("floating", "logits", "gemm")
}


def _widens(x, ops="floating") -> bool:
    """Whether x is a float16 / bfloat16 tensor on a device whose kernels lack its dtype: the op
    then computes in float32 on float32 copies and rounds its result to x's dtype (torch computes
    these in float32 internally too: its mixed-dtype batch norm keeps float32 statistics, its
    low-precision cross-entropy accumulates in float32)."""
    if getattr(x, "dtype", None) not in _LOW or not isinstance(x, torch.Tensor):
        return False  # the common case first (about 0.1 us a call)
    dev = x.device.type
    if dev not in ("cpu", "cuda"):
        return False  # the binding names the device
    return x.dtype not in _KERNEL_DTYPES[(dev, ops)]


def _f32(t):
    """A float32 copy of a float16 / bfloat16 tensor (differentiable); anything else as it is."""
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in _LOW else t


def _tree(fn, x):
    """fn applied to every tensor in x (a tensor, or tuples / lists of them, or None)."""
    if isinstance(x, (tuple, list)):
        return type(x)(_tree(fn, t) for t in x)
    return fn(x) if isinstance(x, torch.Tensor) else x


def _same_dtype(op, dtype, **named):
    """TypeError naming the first floating tensor in named (tensors, or tuples / lists of them)
    whose dtype is not `dtype`: torch refuses such mixes, and a float32 copy would hide them."""

    def same(t, name):
        if t.dtype.is_floating_point and t.dtype != dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but input has {dtype}")
        return t

    for name, v in named.items():
        _tree(lambda t, name=name: same(t, name), v)


def _widened(op, dtype, call, **named):
    """call(**named) on float32 copies of float16 / bfloat16 operands that all have `dtype`
    (_same_dtype), result rounded to dtype."""
    _same_dtype(op, dtype, **named)
    out = call(**{name: _tree(_f32, v) for name, v in named.items()})
    return _tree(lambda t: t.to(dtype) if t.dtype == torch.float32 else t, out)


def _require_tensors(**args):
    """TypeError naming the first argument that is neither a tensor nor None (called when an op
    failed on an attribute of one)."""
    for name, t in args.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def matmul(a, b):
    """Matrix product with torch.matmul's semantics.

    (M, K) @ (K, N) -> (M, N); batched (..., M, K) @ (..., K, N) with broadcast batch dims; 1-D
    operands are treated as a row (a) or a column (b) vector and that dimension is dropped, as in
    torch. float32/float64 on CPU, float32 on CUDA.
    """
    if _autocast_on(a):
        cast = _autocast_gemm_args(a, b)
        if cast is None:
            return torch.matmul(a, b)
        a, b = cast
    if _widens(a, "gemm"):
        return _widened("matmul", a.dtype, _mm.matmul, a=a, b=b)
    try:
        return _mm.matmul(a, b)
    except AttributeError:
        _require_tensors(a=a, b=b)
        raise


def linear(input, weight, bias=None):
    """y = input @ weight^T + bias, as torch.nn.functional.linear.

    input (*, in_features), weight (out_features, in_features), bias (out_features,) or None ->
    (*, out_features). The bias is added inside the GEMM; the leading dims of input are folded
    into the GEMM's M dimension.
    """
    if _any_autocast() and _autocast_on(input):
        cast = _autocast_gemm_args(input, weight, bias)
        if cast is None:
            return torch.nn.functional.linear(input, weight, bias)
        input, weight, bias = cast
    if _widens(input, "gemm"):
        return _widened("linear", input.dtype, _mm.linear, input=input, weight=weight, bias=bias)
    try:
        return _mm.linear(input, weight, bias)
    except AttributeError:
        _require_tensors(input=input, weight=weight, bias=bias)
        raise


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution, as torch.nn.functional.conv2d (cross-correlation, zero padding).

    input (N, C, H, W) or unbatched (C, H, W); weight (K, C/groups, R, S); bias (K,) or None.
    stride and dilation: int or (h, w); padding: int, (h, w), 'valid' or 'same' (stride 1; an odd
    total padding puts the extra row/column after, as torch does). Returns (N, K, P, Q), in
    channels_last memory format when input or weight is.
    """
    if _autocast_on(input):
        cast = _autocast_gemm_args(input, weight, bias)
        if cast is None:
            return torch.nn.functional.conv2d(
                input, weight, bias, stride, padding, dilation, groups
            )
        input, weight, bias = cast
    if _widens(input, "gemm"):
        geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        return _widened(
            "conv2d",
            input.dtype,
            lambda **t: conv2d(**t, **geometry),
            input=input,
            weight=weight,
            bias=bias,
        )
    try:
        return _conv.conv2d(input, weight, bias, stride, padding, dilation, groups)
    except AttributeError:
        _require_tensors(input=input, weight=weight, bias=bias)
        raise


def batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    """Batch normalization, as torch.nn.functional.batch_norm.

    input (N, C, *): statistics per channel over N and the other dims. training: normalise with
    the batch statistics (biased variance) and, when running_mean / running_var are given, update
    them in place: running = (1 - momentum) * running + momentum * batch (unbiased variance).
    Otherwise normalise with the running statistics. weight, bias: (C,) or None.
    float16 / bfloat16 input (with float32 or same-dtype weight, bias and running statistics, as
    torch's mixed-dtype batch norm takes them): computed in float32, returned in input's dtype.
    On the CPU a bfloat16 input with float32 (or no) parameters and statistics runs the
    mixed-dtype kernels (one bfloat16 read and write per pass, float32 statistics); the other
    combinations compute on float32 copies.
    """
    if _widens(input) and not _bf16_mixed(input, running_mean, running_var, weight, bias):
        return _batch_norm_widened(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    try:
        return _bn.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    except AttributeError:
        _require_tensors(
            input=input,
            running_mean=running_mean,
            running_var=running_var,
            weight=weight,
            bias=bias,
        )
        raise


def _bf16_mixed(input, *params) -> bool:
    """A bfloat16 CPU input whose per-channel tensors are all float32 or None (the kernels'
    mixed-dtype batch norm)."""
    return (
        input.dtype == torch.bfloat16
        and input.device.type == "cpu"
        and all(p is None or getattr(p, "dtype", None) == torch.float32 for p in params)
    )


def _batch_norm_widened(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """batch_norm of a float16 / bfloat16 input on float32 copies; running statistics held in
    the input's dtype are updated through float32 copies and rounded back. As in torch, the
    other tensors are all float32 or all the input's dtype."""
    named = dict(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    dtypes = {t.dtype for t in named.values() if isinstance(t, torch.Tensor)}
    if len(dtypes) > 1 or dtypes - {torch.float32, input.dtype}:
        found = ", ".join(f"{k} {v.dtype}" for k, v in named.items() if v is not None)
        raise TypeError(
            f"batch_norm: with a {input.dtype} input, weight, bias and the running statistics "
            f"must all be float32 or all {input.dtype}; got {found}"
        )
    stats = (running_mean, running_var)
    wide = [_f32(t) for t in stats]
    out = batch_norm(
        input.float(), wide[0], wide[1], _f32(weight), _f32(bias), training, momentum, eps
    )
    if training:
        for t, w in zip(stats, wide):
            if w is not t:
                t.copy_(w)
    return out.to(input.dtype)


def cross_entropy(
    input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0
):
    """Softmax cross-entropy, as torch.nn.functional.cross_entropy, in one fused pass per row.

    input: (C,), (N, C) or (N, C, d1, ...) logits. target: class indices (int64) of shape (), (N,)
    or (N, d1, ...), each in [0, C) or ignore_index; or class probabilities of input's shape and
    dtype. weight: (C,) class weights. reduction 'mean' divides by the summed weights of the
    targets that count (the batch size for probability targets), as torch does.
    Under torch.autocast the floating arguments are cast to float32 first (cross_entropy is on
    both devices' float32 lists). float16 / bfloat16 logits where the kernels lack the dtype are
    computed in float32 and the loss returned in torch's dtype (input's, or its promotion with
    a floating target's).
    """
    smoothing = _ce.options(reduction, label_smoothing, ignore_index)
    if _any_autocast() and _autocast_on(input):
        input, target, weight = _f32(input), _f32(target), _f32(weight)
    elif _widens(input, "logits"):
        return _cross_entropy_widened(input, target, weight, ignore_index, reduction, smoothing)
    try:
        return _ce.cross_entropy(input, target, weight, ignore_index, reduction, smoothing)
    except AttributeError:
        _require_tensors(input=input, target=target, weight=weight)
        raise


def _cross_entropy_widened(input, target, weight, ignore_index, reduction, smoothing):
    """cross_entropy of float16 / bfloat16 logits on float32 copies (float64 ones with a float64
    probability target), in torch's result dtype."""
    _same_dtype("cross_entropy", input.dtype, weight=weight)
    soft = isinstance(target, torch.Tensor) and target.dtype.is_floating_point
    dtype = torch.promote_types(input.dtype, target.dtype) if soft else input.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    target = target.to(work) if soft else target
    weight = weight.to(work) if isinstance(weight, torch.Tensor) else weight
    loss = _ce.cross_entropy(input.to(work), target, weight, ignore_index, reduction, smoothing)
    return loss.to(dtype)


def linear_cross_entropy(
    input, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0
):
    """cross_entropy(linear(input, weight, bias), target, ...) without the full logits.

    input (*, H); weight (V, H); bias (V,) or None; target (*) class indices (int64). The logits
    are formed, reduced to the loss and turned into gradients a chunk of rows at a time (about
    64 MB of logits per chunk), so memory stays bounded for any vocabulary V and batch.
    float16 / bfloat16 operands: computed on float32 copies, the loss in their dtype (torch's).
    """
    smoothing = _ce.options(reduction, label_smoothing, ignore_index)
    if _widens(input):  # float16 / bfloat16: float32 copies, the loss in input's dtype as torch
        return _widened(
            "linear_cross_entropy",
            input.dtype,
            lambda input, weight, bias: _ce.linear_cross_entropy(
                input, weight, target, bias, ignore_index, reduction, smoothing
            ),
            input=input,
            weight=weight,
            bias=bias,
        )
    try:
        return _ce.linear_cross_entropy(
            input, weight, target, bias, ignore_index, reduction, smoothing
        )
    except AttributeError:
        _require_tensors(input=input, weight=weight, target=target, bias=bias)
        raise


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """(h', c') = one step of torch.nn.LSTMCell: gates = input w_ih^T + b_ih + h w_hh^T + b_hh in
    the order (i, f, g, o); c' = sigmoid(f) c + sigmoid(i) tanh(g); h' = sigmoid(o) tanh(c').

    input (B, I) or unbatched (I,); hx = (h, c), each (B, H) or (H,) (None: zeros); w_ih (4H, I),
    w_hh (4H, H), b_ih, b_hh (4H,) or None. One GEMM pair into the (B, 4H) gates, one fused
    pointwise kernel; the backward is one fused kernel plus GEMMs.
    """
    h, c = _lstm.hx_pair(hx, "lstm_cell")
    if _autocast_on(input) and input.dtype != torch.float64:
        if input.device.type != "cpu":  # no float16 / bfloat16 CUDA kernels: torch's result
            zeros = input.new_zeros(*input.shape[:-1], w_hh.shape[-1]) if h is None else None
            return torch.lstm_cell(
                input,
                (zeros if h is None else h, zeros if c is None else c),
                w_ih,
                w_hh,
                b_ih,
                b_hh,
            )
        # torch's autocast computes the gate GEMMs in the autocast dtype and the cell update in
        # the promotion of that with c's dtype (the input's when hx is None), which it returns;
        # here all in float32, on float32 copies, rounded to that dtype.
        dtype = torch.promote_types(_autocast_dtype("cpu"), (input if c is None else c).dtype)
        args = [_f32(t) for t in (input, h, c, w_ih, w_hh, b_ih, b_hh)]
        return tuple(t.to(dtype) for t in _lstm.lstm_cell(*args))
    if _widens(input):
        return _widened(
            "lstm_cell",
            input.dtype,
            lambda input, h, c, **w: lstm_cell(input, (h, c), **w),
            input=input,
            h=h,
            c=c,
            w_ih=w_ih,
            w_hh=w_hh,
            b_ih=b_ih,
            b_hh=b_hh,
        )
    try:
        return _lstm.lstm_cell(input, h, c, w_ih, w_hh, b_ih, b_hh)
    except AttributeError:
        _require_tensors(input=input, h=h, c=c, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
        raise


def _lstm_autocast(input, h0, c0, params, has_biases, num_layers, dropout, train, D, batch_first):
    """torch's LSTM (torch.lstm, as torch.nn.LSTM calls it), for inputs under torch.autocast."""
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(1)
    if h0 is None or c0 is None:
        zeros = x.new_zeros(
            num_layers * D, x.shape[0 if batched and batch_first else 1], params[1].shape[-1]
        )
    h0 = zeros if h0 is None else h0 if batched else h0.unsqueeze(1)
    c0 = zeros if c0 is None else c0 if batched else c0.unsqueeze(1)
    args = (list(params), has_biases, num_layers, dropout, train, D == 2, batch_first and batched)
    out, h_n, c_n = torch.lstm(x, (h0, c0), *args)
    if not batched:
        return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    return out, (h_n, c_n)


def lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """torch.lstm's functional form (what torch.nn.LSTM calls): -> (output, (h_n, c_n)).

    input (T, B, I) ((B, T, I) when batch_first) or unbatched (T, I); hx = (h0, c0), each
    (num_layers * D, B, H) or None (zeros); params: per layer and direction w_ih, w_hh (and b_ih,
    b_hh when has_biases), torch.nn.LSTM's _flat_weights order. Dropout (p = dropout) on the
    outputs of every layer but the last, when train. One C++ call per layer and direction runs
    the whole sequence.
    """
    h0, c0 = _lstm.hx_pair(hx, "lstm")
    if _autocast_on(input) and input.dtype != torch.float64:
        if input.device.type != "cpu":  # no float16 / bfloat16 CUDA kernels: torch's result
            D = 2 if bidirectional else 1
            return _lstm_autocast(
                input, h0, c0, params, has_biases, num_layers, dropout, train, D, batch_first
            )
        # torch's CPU autocast runs the LSTM in the autocast dtype and returns it for the output
        # and both states; here the float32 kernels on float32 copies, each result rounded.
        low = _autocast_dtype("cpu")
        config = (has_biases, num_layers, dropout, train, bidirectional, batch_first)
        out, (h_n, c_n) = _lstm.lstm(
            _f32(input), _f32(h0), _f32(c0), [_f32(p) for p in params], *config
        )
        return out.to(low), (h_n.to(low), c_n.to(low))
    if _widens(input):
        config = (has_biases, num_layers, dropout, train, bidirectional, batch_first)
        return _widened(
            "lstm",
            input.dtype,
            lambda input, h0, c0, params: lstm(input, (h0, c0), params, *config),
            input=input,
            h0=h0,
            c0=c0,
            params=list(params),
        )
    try:
        return _lstm.lstm(
            input,
            h0,
            c0,
            params,
            has_biases,
            num_layers,
            dropout,
            train,
            bidirectional,
            batch_first,
        )
    except AttributeError:
        _require_tensors(input=input, h0=h0, c0=c0)
        for k, p in enumerate(params):
            _require_tensors(**{f"params[{k}]": p})
        raise
