"""conv2d: the three passes, their autograd Functions and the argument normalisation.

Shapes: x (N, C, H, W), w (K, C/groups, R, S), y (N, K, P, Q); `p` is a ConvParams.
The three passes are bilinear, so each one's backward is written with the others:
  y  = conv(x, w) + b            -> dx = bwd_data(dy, w),  (dw, db) = bwd_weight(x, dy)
  dx = bwd_data(dy, w)           -> d_dy = conv(g, w),      d_w = bwd_weight(g, dy)
  dw, db = bwd_weight(x, dy)     -> d_x = bwd_data(dy, g_w), d_dy = conv(x, g_w) + g_b
which makes double backward (gradgradcheck) work.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from .. import _native as N
from ._dispatch import Function, apply, primitive, recording


class ConvParams(NamedTuple):
    stride: tuple  # (sh, sw)
    padding: tuple  # (top, bottom, left, right), zeros
    dilation: tuple  # (dh, dw)
    groups: int
    x_shape: tuple  # (N, C, H, W) of the input
    w_shape: tuple  # (K, C/groups, R, S)
    channels_last: bool  # memory format of y and dx


def _format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _pixels_flatten(t):
    """The kernels need the (H, W) dims of an activation to flatten into one index."""
    h, w = t.shape[2], t.shape[3]
    return h <= 1 or w <= 1 or t.stride(2) == w * t.stride(3)


def _as_kernel_activation(t):
    return t if _pixels_flatten(t) else t.contiguous()


def _as_kernel_weight(w):
    return w if w.is_contiguous() else w.contiguous()


def output_shape(x_shape, w_shape, stride, padding, dilation):
    n, _, h, w = x_shape
    k, _, r, s = w_shape
    (sh, sw), (pt, pb, pl, pr), (dh, dw) = stride, padding, dilation
    return (
        n,
        k,
        (h + pt + pb - dh * (r - 1) - 1) // sh + 1,
        (w + pl + pr - dw * (s - 1) - 1) // sw + 1,
    )


def _empty(shape, like, channels_last):
    return torch.empty(
        shape, dtype=like.dtype, device=like.device, memory_format=_format(channels_last)
    )


# --------------------------------------------------------------------------------- primitives
# Geometry arguments: stride (2), padding (top, bottom, left, right), dilation (2), groups, and
# the memory format of the outputs shaped like activations.


def _forward_out(x, w, b, stride, padding, dilation, groups, channels_last):
    return _empty(output_shape(x.shape, w.shape, stride, padding, dilation), x, channels_last)


@primitive("conv2d", fake=_forward_out)
def forward_kernel(
    x: Tensor,
    w: Tensor,
    b: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    channels_last: bool,
) -> Tensor:
    y = _forward_out(x, w, b, stride, padding, dilation, groups, channels_last)
    N.conv2d_forward(
        _as_kernel_activation(x), _as_kernel_weight(w), b, y, stride, padding, dilation, groups
    )
    return y


def _backward_data_out(dy, w, x_shape, stride, padding, dilation, groups, channels_last):
    return _empty(x_shape, dy, channels_last)


@primitive("conv2d_backward_data", fake=_backward_data_out)
def backward_data_kernel(
    dy: Tensor,
    w: Tensor,
    x_shape: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    channels_last: bool,
) -> Tensor:
    dx = _backward_data_out(dy, w, x_shape, stride, padding, dilation, groups, channels_last)
    N.conv2d_backward_data(
        _as_kernel_activation(dy), _as_kernel_weight(w), dx, stride, padding, dilation, groups
    )
    return dx


def _backward_weight_out(x, dy, w_shape, stride, padding, dilation, groups, with_bias):
    dw = torch.empty(w_shape, dtype=x.dtype, device=x.device)
    return dw, torch.empty(w_shape[0] if with_bias else 0, dtype=x.dtype, device=x.device)


@primitive("conv2d_backward_weight", fake=_backward_weight_out)
def backward_weight_kernel(
    x: Tensor,
    dy: Tensor,
    w_shape: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    with_bias: bool,
) -> tuple[Tensor, Tensor]:
    """(dw, db); db is empty unless with_bias."""
    dw, db = _backward_weight_out(x, dy, w_shape, stride, padding, dilation, groups, with_bias)
    N.conv2d_backward_weight(
        _as_kernel_activation(x),
        _as_kernel_activation(dy),
        dw,
        db if with_bias else None,
        stride,
        padding,
        dilation,
        groups,
    )
    return dw, db


@primitive("sum_channels", fake=lambda x: x.new_empty(x.shape[1]))
def sum_channels_kernel(x: Tensor) -> Tensor:
    out = x.new_empty(x.shape[1])
    N.sum_channels(_as_kernel_activation(x), out)
    return out


def _geometry(p: ConvParams):
    return p.stride, p.padding, p.dilation, p.groups


# --------------------------------------------------------------------------------- Functions


class Conv2dFunction(Function):
    @staticmethod
    def forward(x, w, b, p):
        return forward_kernel(x, w, b, *_geometry(p), p.channels_last)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _, p = inputs
        need_x, need_w, _, _ = ctx.needs_input_grad
        ctx.p = p
        ctx.save_for_backward(x if need_w else None, w if need_x else None)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        dx = backward_data(dy, w, ctx.p) if need_x else None
        dw = db = None
        if need_w:
            dw, db = backward_weight(x, dy, ctx.p, need_b)
        elif need_b:
            db = sum_channels(dy)
        return dx, dw, db, None


class Conv2dBackwardDataFunction(Function):
    @staticmethod
    def forward(dy, w, p):
        return backward_data_kernel(dy, w, p.x_shape, *_geometry(p), p.channels_last)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, w, p = inputs
        ctx.p = p
        ctx.save_for_backward(dy, w)

    @staticmethod
    def backward(ctx, g):
        dy, w = ctx.saved_tensors
        need_dy, need_w, _ = ctx.needs_input_grad
        d_dy = conv(g, w, None, ctx.p) if need_dy else None
        d_w = backward_weight(g, dy, ctx.p, False)[0] if need_w else None
        return d_dy, d_w, None


class Conv2dBackwardWeightFunction(Function):
    @staticmethod
    def forward(x, dy, p, with_bias):
        return backward_weight_kernel(x, dy, p.w_shape, *_geometry(p), with_bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, dy, p, with_bias = inputs
        ctx.p, ctx.with_bias = p, with_bias
        ctx.set_materialize_grads(False)
        if not with_bias:
            ctx.mark_non_differentiable(output[1])  # the empty placeholder of db
        ctx.save_for_backward(x, dy)

    @staticmethod
    def backward(ctx, g_w, g_b):
        x, dy = ctx.saved_tensors
        need_x, need_dy, _, _ = ctx.needs_input_grad
        if g_w is None:  # only the bias gradient was used: d_dy is g_b broadcast
            d_dy = g_b[None, :, None, None].expand_as(dy) if need_dy and g_b is not None else None
            return None, d_dy, None, None
        d_x = backward_data(dy, g_w, ctx.p) if need_x else None
        d_dy = conv(x, g_w, g_b, ctx.p) if need_dy else None
        return d_x, d_dy, None, None


class SumChannelsFunction(Function):
    @staticmethod
    def forward(x):
        return sum_channels_kernel(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, g):
        return g[None, :, None, None].expand(ctx.shape)


# ----------------------------------------------------------------- ops: record only when needed


def conv(x, w, b, p: ConvParams):
    if recording(x, w, b):
        return apply(Conv2dFunction, x, w, b, p)
    return forward_kernel(x, w, b, *_geometry(p), p.channels_last)


def backward_data(dy, w, p: ConvParams):
    if recording(dy, w):
        return apply(Conv2dBackwardDataFunction, dy, w, p)
    return backward_data_kernel(dy, w, p.x_shape, *_geometry(p), p.channels_last)


def backward_weight(x, dy, p: ConvParams, with_bias: bool):
    """(dw, db); db is None unless with_bias."""
    if recording(x, dy):
        dw, db = apply(Conv2dBackwardWeightFunction, x, dy, p, with_bias)
    else:
        dw, db = backward_weight_kernel(x, dy, p.w_shape, *_geometry(p), with_bias)
    return dw, db if with_bias else None


def sum_channels(x):
    """(C,) sums over n, h, w of a 4-D x: the bias gradient."""
    if recording(x):
        return apply(SumChannelsFunction, x)
    return sum_channels_kernel(x)


# ------------------------------------------------------------------- argument normalisation


def pair(value, name, minimum):
    """An int or a sequence of 1 or 2 ints as a 2-tuple, each at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list)):
        raise TypeError(f"conv2d: {name} must be an int or a tuple of 2 ints, got {value!r}")
    pr = (value, value) if isinstance(value, int) else tuple(value)
    if len(pr) == 1:
        pr = (pr[0], pr[0])
    if len(pr) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pr):
        raise TypeError(f"conv2d: {name} must be an int or a tuple of 2 ints, got {value!r}")
    if min(pr) < minimum:
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"conv2d: {name} must be {what}, got {value!r}")
    return pr


def is_channels_last(t) -> bool:
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


def padding_of(padding, stride, eh, ew):
    """(top, bottom, left, right) for torch's padding argument: int, (h, w), 'valid' or 'same'
    (stride 1; an odd total padding puts the extra row/column after, as torch does). eh, ew: the
    dilated kernel extent."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("conv2d: padding='same' is not supported for strided convolutions")
            return ((eh - 1) // 2, eh - 1 - (eh - 1) // 2, (ew - 1) // 2, ew - 1 - (ew - 1) // 2)
        raise ValueError(
            f"conv2d: padding must be 'valid', 'same', an int or a pair, got {padding!r}"
        )
    ph, pw = pair(padding, "padding", 0)
    return (ph, ph, pw, pw)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution, as torch.nn.functional.conv2d (cross-correlation, zero padding).

    input (N, C, H, W) or unbatched (C, H, W); weight (K, C/groups, R, S); bias (K,) or None.
    Returns (N, K, P, Q), in channels_last memory format when input or weight is. Geometry,
    shapes, dtypes and devices are checked by the binding, which names the argument.
    """
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
    stride = pair(stride, "stride", 1)
    dilation = pair(dilation, "dilation", 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"conv2d: groups must be a positive int, got {groups!r}")
    h, w = input.shape[2:]
    r, s = weight.shape[2:]
    eh, ew = dilation[0] * (r - 1) + 1, dilation[1] * (s - 1) + 1  # dilated kernel extent
    pad = padding_of(padding, stride, eh, ew)
    if eh > h + pad[0] + pad[1] or ew > w + pad[2] + pad[3]:  # before the output is allocated
        raise ValueError(
            f"conv2d: the kernel ({eh} x {ew} with dilation) is larger than the padded input "
            f"({h + pad[0] + pad[1]} x {w + pad[2] + pad[3]})"
        )
    p = ConvParams(
        stride,
        pad,
        dilation,
        groups,
        tuple(input.shape),
        tuple(weight.shape),
        is_channels_last(input) or is_channels_last(weight),
    )
    return conv(input, weight, bias, p)
