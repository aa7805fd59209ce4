"""torch.nn.functional twins backed by nnkernels' kernels. Same signatures, same results (within
torch's own rounding), gradients through each op's own torch.autograd.Function."""

import math

import torch

from . import _checks, _library
from ._autograd import batch_norm as _bn_ops
from ._autograd import conv2d as _conv_ops
from ._autograd import cross_entropy as _ce_ops
from ._autograd import lstm as _lstm_ops
from ._autograd import matmul as _mm_ops

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


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix product with torch.matmul's semantics.

    (M, K) @ (K, N) -> (M, N); batched (..., M, K) @ (..., K, N) with broadcast batch dims; 1-D
    operands are treated as a row (a) or a column (b) vector and that dimension is dropped, as in
    torch. float32/float64 on CPU, float32 on CUDA.
    """
    if _checks.autocast_on(a):  # torch computes it in float16 / bfloat16 there: torch's result
        return torch.matmul(a, b)
    _checks.check_operands(a, "a", b, "b")
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(
            f"matmul needs a and b to be at least 1-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.dim() == 1 and b.dim() == 1:
        _check_inner(a, b, a.shape[0], b.shape[0])
        return _mm_ops.mm(a.unsqueeze(0), b.unsqueeze(1)).reshape(())
    if a.dim() == 1:
        return matmul(a.unsqueeze(0), b).squeeze(-2)
    if b.dim() == 1:
        return matmul(a, b.unsqueeze(-1)).squeeze(-1)

    (M, K), (K2, N) = a.shape[-2:], b.shape[-2:]
    _check_inner(a, b, K, K2)
    if a.dim() == 2 and b.dim() == 2:
        return _mm_ops.mm(a, b)
    if b.dim() == 2:
        # (..., M, K) @ (K, N): fold the batch into M, one large GEMM (a view when a allows).
        rows = math.prod(a.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous when K == 0
        return _mm_ops.mm(a.reshape(rows, K), b).reshape(*a.shape[:-1], N)
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"matmul: the batch dimensions of a {tuple(a.shape)} and b {tuple(b.shape)} "
            "do not broadcast"
        ) from None
    # A broadcast operand is an expanded view (batch stride 0): no copy unless several batch dims
    # cannot be flattened into one.
    nb = math.prod(batch)
    a3 = a.expand(*batch, M, K).reshape(nb, M, K)
    b3 = b.expand(*batch, K, N).reshape(nb, K, N)
    return _mm_ops.mm(a3, b3).reshape(*batch, M, N)


def _check_inner(a, b, k_a, k_b):
    if k_a != k_b:
        raise ValueError(
            f"matmul: a {tuple(a.shape)} and b {tuple(b.shape)} cannot be multiplied "
            f"(inner dimensions {k_a} and {k_b} differ)"
        )


def linear(input: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """y = input @ weight^T + bias, as torch.nn.functional.linear.

    input (*, in_features), weight (out_features, in_features), bias (out_features,) or None ->
    (*, out_features). The bias is added inside the GEMM; the leading dims of input are folded
    into the GEMM's M dimension.
    """
    if _checks.autocast_on(input):  # torch computes it in float16 / bfloat16 there: torch's result
        return torch.nn.functional.linear(input, weight, bias)
    _checks.check_operands(input, "input", weight, "weight", bias, "bias")
    if input.dim() == 0:
        raise ValueError("linear: input must be at least 1-D (*, in_features), got a 0-D tensor")
    if weight.dim() == 1:
        raise NotImplementedError(
            "linear: a 1-D weight (torch's vector form) is not supported; pass it as (1, in_features)"
        )
    if weight.dim() != 2:
        raise ValueError(
            f"linear: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    if input.shape[-1] != in_features:
        raise ValueError(
            f"linear: input has {input.shape[-1]} features in its last dimension (shape "
            f"{tuple(input.shape)}) but weight {tuple(weight.shape)} expects {in_features}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(
            f"linear: bias must have shape ({out_features},) to match weight "
            f"{tuple(weight.shape)}, got {tuple(bias.shape)}"
        )
    if input.dim() == 2:  # no reshape: a view would add a node to the autograd graph
        return _mm_ops.linear(input, weight, bias)
    x2 = input.reshape(math.prod(input.shape[:-1]), in_features)
    return _mm_ops.linear(x2, weight, bias).reshape(*input.shape[:-1], out_features)


# ------------------------------------------------------------------------------------- conv2d


def _pair(value, name, minimum):
    """An int or a sequence of 1 or 2 ints as a 2-tuple, each at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list)):
        raise TypeError(f"conv2d: {name} must be an int or a tuple of 2 ints, got {value!r}")
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) == 1:
        pair = (pair[0], pair[0])
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise TypeError(f"conv2d: {name} must be an int or a tuple of 2 ints, got {value!r}")
    if min(pair) < minimum:
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"conv2d: {name} must be {what}, got {value!r}")
    return pair


def _is_channels_last(t) -> bool:
    """torch's suggest_memory_format() == channels_last for a 4-D tensor, decided from the strides
    as c10's is_channels_last_strides_2d does (so ambiguous shapes, C == 1 or H == W == 1, come
    out as torch's own conv would have them)."""
    if t.dim() != 4:
        return False
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    smallest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution, as torch.nn.functional.conv2d (cross-correlation, zero padding).

    input (N, C, H, W) or unbatched (C, H, W); weight (K, C/groups, R, S); bias (K,) or None.
    stride and dilation: int or (h, w); padding: int, (h, w), 'valid' or 'same' (stride 1; an odd
    total padding puts the extra row/column after, as torch does). Returns (N, K, P, Q), in
    channels_last memory format when input or weight is.
    """
    if _checks.autocast_on(input):  # torch computes it in float16 / bfloat16 there: torch's result
        return torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
    _checks.check_operands(input, "input", weight, "weight", bias, "bias")
    if input.dim() not in (3, 4):
        raise ValueError(
            f"conv2d: input must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape {tuple(input.shape)}"
        )
    if weight.dim() != 4:
        raise ValueError(
            f"conv2d: weight must be 4-D (K, C/groups, R, S), got shape {tuple(weight.shape)}"
        )
    if input.dim() == 3:
        return conv2d(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups).squeeze(
            0
        )
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"conv2d: groups must be a positive int, got {groups!r}")
    n, c, h, w = input.shape
    k, cg, r, s = weight.shape
    if c % groups or k % groups:
        raise ValueError(
            f"conv2d: groups={groups} must divide both the input channels ({c}) and the output "
            f"channels ({k})"
        )
    if cg * groups != c:
        raise ValueError(
            f"conv2d: weight {tuple(weight.shape)} expects {cg * groups} input channels "
            f"({cg} x groups={groups}) but input {tuple(input.shape)} has {c}"
        )
    if bias is not None and tuple(bias.shape) != (k,):
        raise ValueError(f"conv2d: bias must have shape ({k},), got {tuple(bias.shape)}")
    eh, ew = dilation[0] * (r - 1) + 1, dilation[1] * (s - 1) + 1  # dilated kernel extent
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError("conv2d: padding='same' is not supported for strided convolutions")
            pad = ((eh - 1) // 2, eh - 1 - (eh - 1) // 2, (ew - 1) // 2, ew - 1 - (ew - 1) // 2)
        else:
            raise ValueError(
                f"conv2d: padding must be 'valid', 'same', an int or a pair, got {padding!r}"
            )
    else:
        ph, pw = _pair(padding, "padding", 0)
        pad = (ph, ph, pw, pw)
    if eh > h + pad[0] + pad[1] or ew > w + pad[2] + pad[3]:
        raise ValueError(
            f"conv2d: the kernel ({eh} x {ew} with dilation) is larger than the padded input "
            f"({h + pad[0] + pad[1]} x {w + pad[2] + pad[3]})"
        )
    p = _conv_ops.ConvParams(
        stride,
        pad,
        dilation,
        groups,
        tuple(input.shape),
        tuple(weight.shape),
        _is_channels_last(input) or _is_channels_last(weight),
    )
    return _conv_ops.conv(input, weight, bias, p)


# --------------------------------------------------------------------------------- batch_norm


def _bn_train_fast(x, *others) -> bool:
    """Tensors (or None) and an input of at least 2 dims: what the training kernels need before
    they can check the rest."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return False
    return all(t is None or isinstance(t, torch.Tensor) for t in others)


def batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    """Batch normalization, as torch.nn.functional.batch_norm.

    input (N, C, *): statistics per channel over N and the other dims. training: normalise with
    the batch statistics (biased variance) and, when running_mean / running_var are given, update
    them in place: running = (1 - momentum) * running + momentum * batch (unbiased variance).
    Otherwise normalise with the running statistics. weight, bias: (C,) or None.
    """
    if training and _bn_train_fast(input, running_mean, running_var, weight, bias):
        # The training kernels check dtypes, devices and shapes themselves and name the argument;
        # skipping the same checks here keeps the per-call overhead down.
        return _bn_ops.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    _checks.check_operands(
        input,
        "input",
        weight,
        "weight",
        bias,
        "bias",
        running_mean,
        "running_mean",
        running_var,
        "running_var",
    )
    if input.dim() < 2:
        raise ValueError(f"batch_norm: input must be (N, C, *), got shape {tuple(input.shape)}")
    c = input.shape[1]
    for t, name in (
        (running_mean, "running_mean"),
        (running_var, "running_var"),
        (weight, "weight"),
        (bias, "bias"),
    ):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(
                f"batch_norm: {name} must have shape ({c},) for an input with {c} channels, got {tuple(t.shape)}"
            )
    if training:
        if input.numel() // max(c, 1) <= 1 and c > 0:
            raise ValueError(
                f"batch_norm: expected more than 1 value per channel when training, got input of "
                f"shape {tuple(input.shape)}"
            )
    elif running_mean is None or running_var is None:
        raise ValueError(
            "batch_norm: running_mean and running_var must be given when training=False"
        )
    return _bn_ops.batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )


# ------------------------------------------------------------------------------ cross_entropy

_REDUCTIONS = ("none", "mean", "sum")
_CE_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def _ce_options(reduction, label_smoothing, ignore_index):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return float(label_smoothing)


def _ce_logits(input, name="input"):
    _checks.check_tensor(input, name)
    dev = input.device.type
    if dev == "cuda" and not _checks._C.cuda_compiled():
        _checks.check_float(input, name)  # raises the no-CUDA-build error
    ok = _CE_DTYPES.get(dev)
    if ok is None or input.dtype not in ok:
        if not input.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {input.dtype}")
        raise NotImplementedError(
            f"{name} has dtype {input.dtype} on {dev}; nnkernels cross_entropy supports "
            + (", ".join(str(d) for d in ok) if ok else "cpu and cuda tensors")
        )


def _class_target(target, shape):
    """target holds class indices: int64 of the input's shape without the class dim."""
    if target.dtype != torch.int64:
        raise TypeError(
            f"target must hold class indices as torch.int64 (or probabilities of the input's "
            f"float dtype), got dtype {target.dtype}"
        )
    if tuple(target.shape) != shape:
        raise ValueError(
            f"target must have shape {shape} (the input's shape without the class dim), got "
            f"{tuple(target.shape)}"
        )


def cross_entropy(
    input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0
):
    """Softmax cross-entropy, as torch.nn.functional.cross_entropy, in one fused pass per row.

    input: (C,), (N, C) or (N, C, d1, ...) logits. target: class indices (int64) of shape (), (N,)
    or (N, d1, ...), each in [0, C) or ignore_index; or class probabilities of input's shape and
    dtype. weight: (C,) class weights. reduction 'mean' divides by the summed weights of the
    targets that count (the batch size for probability targets), as torch does.
    """
    smoothing = _ce_options(reduction, label_smoothing, ignore_index)
    _ce_logits(input)
    _checks.check_tensor(target, "target")
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dim (C,), got a 0-d tensor")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    unbatched = input.dim() == 1
    if unbatched:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    c = input.shape[1]
    soft = target.dtype.is_floating_point
    if soft:
        if tuple(target.shape) != tuple(input.shape):
            raise ValueError(
                f"target of probabilities must have the input's shape {tuple(input.shape)}, got "
                f"{tuple(target.shape)}"
            )
        _checks.check_same(target, "target", input, "input")
    else:
        _class_target(target, (input.shape[0], *input.shape[2:]))
    if weight is not None:
        _checks.check_same(weight, "weight", input, "input")
        if tuple(weight.shape) != (c,):
            raise ValueError(
                f"weight must have shape ({c},) for an input with {c} classes, got "
                f"{tuple(weight.shape)}"
            )
        if weight.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError("weight requires grad: cross_entropy has no weight gradient")
        weight = weight.contiguous()
    if soft and target.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "target (probabilities) requires grad: nnkernels computes the gradient of input only"
        )
    if not soft and c == 0 and input.shape[0] > 0:
        raise ValueError("input has 0 classes")

    # rows (N * d1 * ..., C) with unit class stride; the gradient comes back in input's shape
    x = input if input.dim() == 2 else input.movedim(1, -1).reshape(-1, c)
    if c > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    t2 = target.movedim(1, -1).reshape(-1, c) if soft and target.dim() > 2 else target
    if soft:
        probs, hard = t2 if c <= 1 or t2.stride(-1) == 1 else t2.contiguous(), None
    else:
        probs, hard = None, t2.reshape(-1).contiguous()
    args = (hard, probs, weight, ignore_index, reduction, smoothing)
    if torch.compiler.is_compiling():  # one custom op; the targets are checked inside it
        want_grad = torch.is_grad_enabled() and input.requires_grad
        loss = _library.cross_entropy(x, *args, want_grad)[0]
    else:
        denom = float(x.shape[0]) if soft else _ce_ops.denominator(hard, c, ignore_index, weight)
        if _mm_ops._recording(input):
            loss = _ce_ops.CrossEntropyFunction.apply(x, *args, denom)
        else:
            loss, _ = _ce_ops.rows_forward(x, *args, False, denom)
    if reduction == "none":
        loss = loss.reshape(target.shape[:1] + target.shape[2:] if soft else target.shape)
        if unbatched:
            loss = loss.squeeze(0)
    return loss


def linear_cross_entropy(
    input, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0
):
    """cross_entropy(linear(input, weight, bias), target, ...) without the full logits.

    input (*, H); weight (V, H); bias (V,) or None; target (*) class indices (int64). The logits
    are formed, reduced to the loss and turned into gradients a chunk of rows at a time (about
    64 MB of logits per chunk), so memory stays bounded for any vocabulary V and batch.
    """
    smoothing = _ce_options(reduction, label_smoothing, ignore_index)
    _checks.check_operands(input, "input", weight, "weight", bias, "bias")
    _checks.check_tensor(target, "target")
    if input.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"input must be (*, H) and weight (V, H), got shapes {tuple(input.shape)} and "
            f"{tuple(weight.shape)}"
        )
    h, v = input.shape[-1], weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(
            f"weight must have shape (V, {h}) for an input with {h} features, got "
            f"{tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"bias must have shape ({v},), got {tuple(bias.shape)}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if target.dtype.is_floating_point:
        raise NotImplementedError(
            "linear_cross_entropy takes class-index targets (int64); probability targets: use "
            "cross_entropy(linear(...))"
        )
    _class_target(target, tuple(input.shape[:-1]))
    x = input.reshape(-1, h)
    t = target.reshape(-1).contiguous()
    denom = _ce_ops.denominator(t, v, ignore_index, None)
    args = (ignore_index, reduction, smoothing, denom)
    if _mm_ops._recording(input, weight, bias):
        loss = _ce_ops.LinearCrossEntropyFunction.apply(x, weight, bias, t, *args)
    else:
        loss, *_ = _ce_ops._lce_chunks(
            x, weight, bias, t, ignore_index, smoothing, reduction, denom, (False,) * 3
        )
    return loss.reshape(target.shape) if reduction == "none" else loss


# --------------------------------------------------------------------------------------- lstm


def _lstm_weights(w_ih, w_hh, b_ih, b_hh, input_size, hidden_size, where):
    """w_ih (4H, input_size), w_hh (4H, H), biases (4H,) or None."""
    g = 4 * hidden_size
    for w, name, shape in (
        (w_ih, "w_ih", (g, input_size)),
        (w_hh, "w_hh", (g, hidden_size)),
        (b_ih, "b_ih", (g,)),
        (b_hh, "b_hh", (g,)),
    ):
        if w is not None and tuple(w.shape) != shape:
            raise ValueError(f"{where}: {name} must have shape {shape}, got {tuple(w.shape)}")


def _lstm_state(t, name, shape, ref):
    """A state tensor of `shape` with unit stride along H (the kernels' layout), or zeros."""
    if t is None:
        return ref.new_zeros(shape)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return _lstm_ops._unit_last(t)


def _lstm_hx(hx, where):
    if hx is None:
        return None, None
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(
            f"{where}: hx must be a tuple (h, c) of two tensors, got {type(hx).__name__}"
        )
    return hx


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """(h', c') = one step of torch.nn.LSTMCell: gates = input w_ih^T + b_ih + h w_hh^T + b_hh in
    the order (i, f, g, o); c' = sigmoid(f) c + sigmoid(i) tanh(g); h' = sigmoid(o) tanh(c').

    input (B, I) or unbatched (I,); hx = (h, c), each (B, H) or (H,) (None: zeros); w_ih (4H, I),
    w_hh (4H, H), b_ih, b_hh (4H,) or None. One GEMM pair into the (B, 4H) gates, one fused
    pointwise kernel; the backward is one fused kernel plus GEMMs.
    """
    h, c = _lstm_hx(hx, "lstm_cell")
    if _checks.autocast_on(input):  # torch computes it in float16 / bfloat16 there: torch's result
        zeros = input.new_zeros(*input.shape[:-1], w_hh.shape[-1]) if h is None else None
        return torch.lstm_cell(
            input, (zeros if h is None else h, zeros if c is None else c), w_ih, w_hh, b_ih, b_hh
        )
    _checks.check_operands(
        input, "input", h, "h", c, "c", w_ih, "w_ih", w_hh, "w_hh", b_ih, "b_ih", b_hh, "b_hh"
    )
    if input.dim() not in (1, 2):
        raise ValueError(f"lstm_cell: input must be (B, I) or (I,), got shape {tuple(input.shape)}")
    if w_hh.dim() != 2:
        raise ValueError(f"lstm_cell: w_hh must be 2-D (4H, H), got shape {tuple(w_hh.shape)}")
    H = w_hh.shape[1]
    _lstm_weights(w_ih, w_hh, b_ih, b_hh, input.shape[-1], H, "lstm_cell")
    batched = input.dim() == 2
    x = input if batched else input.unsqueeze(0)
    B = x.shape[0]
    state = (B, H) if batched else (H,)
    h = _lstm_state(h, "h", state, x).reshape(B, H)
    c = _lstm_state(c, "c", state, x).reshape(B, H)
    x3, h3, c3 = _lstm_ops._unit_last(x).unsqueeze(0), h.unsqueeze(0), c.unsqueeze(0)
    y, _, cn = _lstm_ops.lstm_layer(x3, h3, c3, (w_ih, w_hh, b_ih, b_hh), 1)
    h1, c1 = y[0], cn[0]
    return (h1, c1) if batched else (h1[0], c1[0])


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
    D = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    if len(params) != num_layers * D * per:
        raise ValueError(
            f"lstm: expected {num_layers * D * per} parameter tensors for num_layers={num_layers}, "
            f"bidirectional={bidirectional}, bias={has_biases}, got {len(params)}"
        )
    h0, c0 = _lstm_hx(hx, "lstm")
    if _checks.autocast_on(input):  # torch computes it in float16 / bfloat16 there: torch's result
        return _lstm_autocast(
            input, h0, c0, params, has_biases, num_layers, dropout, train, D, batch_first
        )
    _checks.check_operands(input, "input", h0, "h0", c0, "c0")
    for k, p in enumerate(params):
        _checks.check_same(p, f"params[{k}]", input, "input")
    if input.dim() not in (2, 3):
        raise ValueError(
            f"lstm: input must be (T, B, I), (B, T, I) with batch_first, or unbatched (T, I); got "
            f"shape {tuple(input.shape)}"
        )
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(1)
    if batched and batch_first:
        x = x.transpose(0, 1)
    T, B, _ = x.shape
    if T == 0:
        raise ValueError("lstm: input has sequence length 0; it must be at least 1")
    H = params[1].shape[1] if params[1].dim() == 2 else -1
    if H < 1:
        raise ValueError(
            f"lstm: params[1] (weight_hh_l0) must be (4H, H), got {tuple(params[1].shape)}"
        )
    state = (num_layers * D, B, H) if batched else (num_layers * D, H)
    h0 = _lstm_state(h0, "h0 (hx[0])", state, x).reshape(num_layers * D, B, H)
    c0 = _lstm_state(c0, "c0 (hx[1])", state, x).reshape(num_layers * D, B, H)
    hn, cn = [], []
    for layer in range(num_layers):
        weights = []
        for d in range(D):
            k = (layer * D + d) * per
            w_ih, w_hh = params[k], params[k + 1]
            b_ih, b_hh = (params[k + 2], params[k + 3]) if has_biases else (None, None)
            name = f"lstm layer {layer}{' reverse' if d else ''}"
            if w_ih.dim() != 2 or w_ih.shape[1] != x.shape[2]:
                what = "input" if layer == 0 else f"the output of layer {layer - 1}"
                raise ValueError(
                    f"{name}: {what} has {x.shape[2]} features but weight_ih expects "
                    f"{w_ih.shape[-1] if w_ih.dim() else '?'} (shape {tuple(w_ih.shape)})"
                )
            _lstm_weights(w_ih, w_hh, b_ih, b_hh, x.shape[2], H, name)
            weights += [w_ih, w_hh, b_ih, b_hh]
        if x.stride(2) != 1 or (B > 1 and x.stride(0) != B * x.stride(1)):
            x = x.contiguous()  # the input projection reads (t, b) rows evenly spaced
        rows = slice(layer * D, (layer + 1) * D)
        x, h, c = _lstm_ops.lstm_layer(x, h0[rows], c0[rows], weights, D)
        hn.append(h)
        cn.append(c)
        if train and dropout > 0 and layer + 1 < num_layers:
            x = torch.nn.functional.dropout(x, dropout, training=True)
    h_n, c_n = torch.cat(hn), torch.cat(cn)
    out = x.transpose(0, 1) if batched and batch_first else x
    if not batched:
        return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    return out, (h_n, c_n)
