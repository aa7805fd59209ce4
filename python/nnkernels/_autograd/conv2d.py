"""Autograd Functions of conv2d.

Shapes: x (N, C, H, W), w (K, C/groups, R, S), y (N, K, P, Q); `p` is a ConvParams.
The three passes are bilinear, so each one's backward is written with the others:
  y  = conv(x, w) + b            -> dx = bwd_data(dy, w),  (dw, db) = bwd_weight(x, dy)
  dx = bwd_data(dy, w)           -> d_dy = conv(g, w),      d_w = bwd_weight(g, dy)
  dw, db = bwd_weight(x, dy)     -> d_x = bwd_data(dy, g_w), d_dy = conv(x, g_w) + g_b
which makes double backward (gradgradcheck) work. As for the GEMM ops, each op goes through its
Function only when autograd has to record it.
"""

from typing import NamedTuple

import torch

from .. import _C, _ops
from .matmul import _recording


class ConvParams(NamedTuple):
    stride: tuple  # (sh, sw)
    padding: tuple  # (top, bottom, left, right), zeros
    dilation: tuple  # (dh, dw)
    groups: int
    x_shape: tuple  # (N, C, H, W) of the input
    w_shape: tuple  # (K, C/groups, R, S)
    channels_last: bool  # memory format of y and dx


def _format(p: ConvParams):
    return torch.channels_last if p.channels_last else torch.contiguous_format


def _pixels_flatten(t):
    """The kernels need the (H, W) dims of an activation to flatten into one index."""
    n, c, h, w = t.shape
    return h <= 1 or w <= 1 or t.stride(2) == w * t.stride(3)


def _as_kernel_activation(t):
    return t if _pixels_flatten(t) else t.contiguous()


def _as_kernel_weight(w):
    return w if w.is_contiguous() else w.contiguous()


def _args(p: ConvParams, t):
    stream = torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0
    return p.stride, p.padding, p.dilation, p.groups, stream


def output_shape(p: ConvParams):
    n, _, h, w = p.x_shape
    k, _, r, s = p.w_shape
    (sh, sw), (pt, pb, pl, pr), (dh, dw) = p.stride, p.padding, p.dilation
    return (
        n,
        k,
        (h + pt + pb - dh * (r - 1) - 1) // sh + 1,
        (w + pl + pr - dw * (s - 1) - 1) // sw + 1,
    )


# ----------------------------------------------------------------------------- raw kernel calls


def _forward(x, w, b, p: ConvParams):
    y = torch.empty(output_shape(p), dtype=x.dtype, device=x.device, memory_format=_format(p))
    _ops.sync_threads()
    _C.conv2d_forward(
        _ops.to_dl(x),
        _ops.to_dl(_as_kernel_weight(w)),
        None if b is None else _ops.to_dl(b.contiguous()),
        _ops.to_dl(y),
        *_args(p, x),
    )
    return y


def _backward_data(dy, w, p: ConvParams):
    dx = torch.empty(p.x_shape, dtype=dy.dtype, device=dy.device, memory_format=_format(p))
    _ops.sync_threads()
    _C.conv2d_backward_data(
        _ops.to_dl(_as_kernel_activation(dy)),
        _ops.to_dl(_as_kernel_weight(w)),
        _ops.to_dl(dx),
        *_args(p, dy),
    )
    return dx


def _backward_weight(x, dy, p: ConvParams, with_bias: bool):
    dw = torch.empty(p.w_shape, dtype=x.dtype, device=x.device)
    db = torch.empty(p.w_shape[0], dtype=x.dtype, device=x.device) if with_bias else None
    _ops.sync_threads()
    _C.conv2d_backward_weight(
        _ops.to_dl(x),
        _ops.to_dl(_as_kernel_activation(dy)),
        _ops.to_dl(dw),
        None if db is None else _ops.to_dl(db),
        *_args(p, x),
    )
    return dw, db


# --------------------------------------------------------------------------------- Functions


class Conv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, p):
        need_x, need_w, _, _ = ctx.needs_input_grad
        ctx.p = p
        ctx.save_for_backward(x if need_w else None, w if need_x else None)
        return _forward(x, w, b, p)

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


class Conv2dBackwardDataFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dy, w, p):
        ctx.p = p
        ctx.save_for_backward(dy, w)
        return _backward_data(dy, w, p)

    @staticmethod
    def backward(ctx, g):
        dy, w = ctx.saved_tensors
        need_dy, need_w, _ = ctx.needs_input_grad
        d_dy = conv(g, w, None, ctx.p) if need_dy else None
        d_w = backward_weight(g, dy, ctx.p, False)[0] if need_w else None
        return d_dy, d_w, None


class Conv2dBackwardWeightFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dy, p, with_bias):
        ctx.p = p
        ctx.save_for_backward(x, dy)
        dw, db = _backward_weight(x, dy, p, with_bias)
        return (dw, db) if with_bias else dw

    @staticmethod
    def backward(ctx, g_w, g_b=None):
        x, dy = ctx.saved_tensors
        need_x, need_dy, _, _ = ctx.needs_input_grad
        if g_w is None:  # only the bias gradient was used: d_dy is g_b broadcast
            d_dy = g_b[None, :, None, None].expand_as(dy) if need_dy and g_b is not None else None
            return None, d_dy, None, None
        d_x = backward_data(dy, g_w, ctx.p) if need_x else None
        d_dy = conv(x, g_w, g_b, ctx.p) if need_dy else None
        return d_x, d_dy, None, None


class SumChannelsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return _ops.sum_channels(_as_kernel_activation(x), x.new_empty(x.shape[1]))

    @staticmethod
    def backward(ctx, g):
        return g[None, :, None, None].expand(ctx.shape)


# ----------------------------------------------------------------- ops: record only when needed


def conv(x, w, b, p: ConvParams):
    if torch.compiler.is_compiling():
        geometry = (list(p.stride), list(p.padding), list(p.dilation), p.groups, p.channels_last)
        return _library.conv2d(x, w, b, *geometry)
    if _recording(x, w, b):
        return Conv2dFunction.apply(x, w, b, p)
    return _forward(x, w, b, p)


def backward_data(dy, w, p: ConvParams):
    if _recording(dy, w):
        return Conv2dBackwardDataFunction.apply(dy, w, p)
    return _backward_data(dy, w, p)


def sum_channels(x):
    """(C,) sums over n, h, w of a 4-D x: the bias gradient."""
    if torch.is_grad_enabled() and x.requires_grad:
        return SumChannelsFunction.apply(x)
    return _ops.sum_channels(_as_kernel_activation(x), x.new_empty(x.shape[1]))


def backward_weight(x, dy, p: ConvParams, with_bias: bool):
    """(dw, db); db is None unless with_bias."""
    if _recording(x, dy):
        out = Conv2dBackwardWeightFunction.apply(x, dy, p, with_bias)
        return out if with_bias else (out, None)
    return _backward_weight(x, dy, p, with_bias)


from .. import _library  # noqa: E402  (it builds on this module)
