"""nnkernels' ops as torch.library custom ops, for torch.compile.

Eagerly, each op runs through its own torch.autograd.Function (nnkernels._autograd), which calls
the kernels through DLPack: code torch.compile cannot trace. While torch.compile traces
(torch.compiler.is_compiling()), the same ops go through these custom ops instead: opaque to the
compiler, with fake (meta) functions that give their outputs' shapes and strides, and autograd
formulas written with other custom ops. The kernels and their results are the same on both paths.

    nnkernels::mm, linear, sum_rows                      (GEMM)
    nnkernels::conv2d, conv2d_backward_data, conv2d_backward_weight
    nnkernels::batch_norm_train, batch_norm_apply, batch_norm_backward
    nnkernels::cross_entropy                             (returns the loss and its gradient)
    nnkernels::lstm_layer, lstm_layer_backward           (one layer, both directions)

Functional ops return fresh tensors (nothing aliases an input, nothing is mutated): batch norm
returns updated copies of the running statistics, which the caller copies back; the LSTM
backward works on a copy of the saved gate activations it overwrites.
"""

from typing import List, Optional

import torch
from torch import Tensor
from torch.library import custom_op

from ._autograd import batch_norm as bn_ops
from ._autograd import conv2d as conv_ops
from ._autograd import cross_entropy as ce_ops
from ._autograd import lstm as lstm_ops
from ._autograd import matmul as mm_ops


def _none_if_empty(t):
    return None if t is None or (t.dim() == 1 and t.shape[0] == 0) else t


# ----------------------------------------------------------------------------------- GEMM ops


@custom_op("nnkernels::mm", mutates_args=())
def mm(a: Tensor, b: Tensor) -> Tensor:
    """a (M, K) @ b (K, N), or batched (B, M, K) @ (B, K, N)."""
    return mm_ops._mm_forward(a, b)


@mm.register_fake
def _(a, b):
    return a.new_empty(mm_ops.mm_shape(a, b))


def _mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mm_backward(ctx, dout):
    a, b = ctx.saved_tensors
    da = mm(dout, b.mT) if ctx.needs_input_grad[0] else None
    db = mm(a.mT, dout) if ctx.needs_input_grad[1] else None
    return da, db


mm.register_autograd(_mm_backward, setup_context=_mm_setup)


@custom_op("nnkernels::sum_rows", mutates_args=())
def sum_rows(x: Tensor) -> Tensor:
    """(N,) column sums of x (R, N)."""
    return mm_ops._sum_rows_forward(x)


@sum_rows.register_fake
def _(x):
    return x.new_empty(x.shape[1])


def _sum_rows_setup(ctx, inputs, output):
    ctx.rows = inputs[0].shape[0]


sum_rows.register_autograd(
    lambda ctx, dout: dout.expand(ctx.rows, dout.shape[0]), setup_context=_sum_rows_setup
)


@custom_op("nnkernels::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x (M, in) @ weight^T + bias."""
    return mm_ops._linear_forward(x, weight, bias)


@linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _linear_backward(ctx, dout):
    x, weight, _ = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    return (
        mm(dout, weight) if need_x else None,
        mm(dout.mT, x) if need_w else None,
        sum_rows(dout) if need_b else None,
    )


linear.register_autograd(_linear_backward, setup_context=_mm_setup)


# --------------------------------------------------------------------------------- conv2d ops


def _conv_params(x_shape, w_shape, stride, padding, dilation, groups, channels_last):
    return conv_ops.ConvParams(
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        groups,
        tuple(x_shape),
        tuple(w_shape),
        channels_last,
    )


def _conv_empty(shape, like, p):
    return torch.empty(
        shape, dtype=like.dtype, device=like.device, memory_format=conv_ops._format(p)
    )


@custom_op("nnkernels::conv2d", mutates_args=())
def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    channels_last: bool,
) -> Tensor:
    """padding: (top, bottom, left, right)."""
    p = _conv_params(x.shape, weight.shape, stride, padding, dilation, groups, channels_last)
    return conv_ops._forward(x, weight, bias, p)


@conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, channels_last):
    p = _conv_params(x.shape, weight.shape, stride, padding, dilation, groups, channels_last)
    return _conv_empty(conv_ops.output_shape(p), x, p)


@custom_op("nnkernels::conv2d_backward_data", mutates_args=())
def conv2d_backward_data(
    dy: Tensor,
    weight: Tensor,
    x_shape: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    channels_last: bool,
) -> Tensor:
    p = _conv_params(x_shape, weight.shape, stride, padding, dilation, groups, channels_last)
    return conv_ops._backward_data(dy, weight, p)


@conv2d_backward_data.register_fake
def _(dy, weight, x_shape, stride, padding, dilation, groups, channels_last):
    p = _conv_params(x_shape, weight.shape, stride, padding, dilation, groups, channels_last)
    return _conv_empty(tuple(x_shape), dy, p)


@custom_op("nnkernels::conv2d_backward_weight", mutates_args=())
def conv2d_backward_weight(
    x: Tensor,
    dy: Tensor,
    w_shape: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    channels_last: bool,
    with_bias: bool,
) -> List[Tensor]:
    """[dw, db] (db empty unless with_bias)."""
    p = _conv_params(x.shape, w_shape, stride, padding, dilation, groups, channels_last)
    dw, db = conv_ops._backward_weight(x, dy, p, with_bias)
    return [dw, db if with_bias else dw.new_empty(0)]


@conv2d_backward_weight.register_fake
def _(x, dy, w_shape, stride, padding, dilation, groups, channels_last, with_bias):
    return [x.new_empty(w_shape), x.new_empty(w_shape[0] if with_bias else 0)]


def _conv_setup(ctx, inputs, output):
    x, weight, bias, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(x, weight)


def _conv_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx = conv2d_backward_data(dy, weight, list(x.shape), *ctx.geometry) if need_x else None
    dw = db = None
    if need_w or need_b:
        dw, db = conv2d_backward_weight(x, dy, list(weight.shape), *ctx.geometry, need_b)
    return dx, dw if need_w else None, db if need_b else None, None, None, None, None, None


conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)


# ----------------------------------------------------------------------------- batch norm ops


@custom_op("nnkernels::batch_norm_train", mutates_args=())
def batch_norm_train(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    eps: float,
) -> List[Tensor]:
    """[y, batch mean, batch invstd, new running_mean, new running_var] (the last two empty when
    not given): the running statistics are returned updated, not written."""
    rm = None if running_mean is None else running_mean.clone()
    rv = None if running_var is None else running_var.clone()
    y, mean, invstd = bn_ops.forward_train(x, weight, bias, rm, rv, momentum, eps)
    # one empty tensor per absent statistic: op outputs must not alias each other
    return [
        y,
        mean,
        invstd,
        x.new_empty(0) if rm is None else rm,
        x.new_empty(0) if rv is None else rv,
    ]


@batch_norm_train.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps):
    c = x.shape[1]
    like = lambda t: x.new_empty(0) if t is None else torch.empty_like(t)  # noqa: E731
    return [
        torch.empty_like(bn_ops.as_kernel_input(x)).reshape(x.shape),
        x.new_empty(c),
        x.new_empty(c),
        like(running_mean),
        like(running_var),
    ]


def _bn_train_setup(ctx, inputs, output):
    x, weight = inputs[0], inputs[1]
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.has_w = weight is not None


@custom_op("nnkernels::batch_norm_backward", mutates_args=())
def batch_norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    needs: List[bool],
) -> List[Tensor]:
    """[dx, dw, db], each empty unless needed."""
    fn = bn_ops.backward_train if training else bn_ops.backward_eval
    grads = fn(dy, x, weight, mean, invstd, needs)
    return [x.new_empty(0) if g is None else g for g in grads]


@batch_norm_backward.register_fake
def _(dy, x, weight, mean, invstd, training, needs):
    c = x.shape[1]
    dx = torch.empty_like(bn_ops.as_kernel_input(x)).reshape(x.shape)
    shapes = [dx, x.new_empty(c), x.new_empty(c)]
    return [s if n else x.new_empty(0) for s, n in zip(shapes, needs)]


def _bn_backward(ctx, grads):  # grads: one per output of the list (only y's is used)
    dy = grads[0]
    x, weight, mean, invstd = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = batch_norm_backward(dy, x, weight, mean, invstd, True, needs)
    return (*[g if n else None for g, n in zip(grads, needs)], None, None, None, None)


batch_norm_train.register_autograd(_bn_backward, setup_context=_bn_train_setup)


@custom_op("nnkernels::batch_norm_eval", mutates_args=())
def batch_norm_eval(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    """(x - running_mean) * invstd * weight + bias."""
    scale, shift, _ = bn_ops.eval_scale_shift(weight, bias, running_var, eps)
    return bn_ops.apply(x, running_mean.contiguous(), scale, shift)


@batch_norm_eval.register_fake
def _(x, weight, bias, running_mean, running_var, eps):
    return torch.empty_like(bn_ops.as_kernel_input(x)).reshape(x.shape)


def _bn_eval_setup(ctx, inputs, output):
    x, weight, _, running_mean, running_var, eps = inputs
    ctx.save_for_backward(x, weight, running_mean, torch.rsqrt(running_var + eps))


def _bn_eval_backward(ctx, dy):
    x, weight, mean, invstd = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = batch_norm_backward(dy, x, weight, mean, invstd, False, needs)
    return (*[g if n else None for g, n in zip(grads, needs)], None, None, None)


batch_norm_eval.register_autograd(_bn_eval_backward, setup_context=_bn_eval_setup)


def batch_norm(x, running_mean, running_var, w, b, training, momentum, eps):
    """The compiled path of _autograd.batch_norm.batch_norm."""
    if not training:
        return batch_norm_eval(x, w, b, running_mean, running_var, eps)
    y, _, _, rm, rv = batch_norm_train(x, w, b, running_mean, running_var, momentum, eps)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.copy_(rm)
        if running_var is not None:
            running_var.copy_(rv)
    return y


# -------------------------------------------------------------------------- cross-entropy op


@custom_op("nnkernels::cross_entropy", mutates_args=())
def cross_entropy(
    x: Tensor,
    target: Optional[Tensor],
    soft: Optional[Tensor],
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    smoothing: float,
    want_grad: bool,
) -> List[Tensor]:
    """[loss, d loss / d x (empty unless want_grad)] for logits x (rows, C), unit class stride."""
    denom = (
        float(x.shape[0])
        if target is None
        else ce_ops.denominator(target, x.shape[1], ignore_index, weight)
    )
    args = (target, soft, weight, ignore_index, reduction, smoothing, want_grad, denom)
    loss, grad = ce_ops.rows_forward(x, *args, pooled=False)
    return [loss, x.new_empty(0) if grad is None else grad]


@cross_entropy.register_fake
def _(x, target, soft, weight, ignore_index, reduction, smoothing, want_grad):
    loss = x.new_empty(x.shape[0]) if reduction == "none" else x.new_empty(())
    return [
        loss,
        torch.empty_like(x, memory_format=torch.contiguous_format) if want_grad else x.new_empty(0),
    ]


def _ce_setup(ctx, inputs, output):
    ctx.reduction = inputs[5]
    ctx.save_for_backward(output[1])


def _ce_backward(ctx, grads):  # grads: (d loss, d grad); the gradient output is not differentiated
    dloss = grads[0]
    (g,) = ctx.saved_tensors
    scale = dloss.reshape(-1, 1) if ctx.reduction == "none" else dloss
    return g * scale, None, None, None, None, None, None, None


cross_entropy.register_autograd(_ce_backward, setup_context=_ce_setup)


# ---------------------------------------------------------------------------------- LSTM ops


def _layer_weights(weights, D, has_bias):
    """The flat list (w_ih, w_hh[, b_ih, b_hh]) per direction -> the 4-per-direction list."""
    per = 4 if has_bias else 2
    out = []
    for d in range(D):
        w = list(weights[per * d : per * (d + 1)])
        out += w if has_bias else [*w, None, None]
    return out


@custom_op("nnkernels::lstm_layer", mutates_args=())
def lstm_layer(
    x: Tensor, h0: Tensor, c0: Tensor, weights: List[Tensor], D: int, has_bias: bool
) -> List[Tensor]:
    """[y, h_n, c_n, gates per direction..., cell states per direction...] of one layer."""
    y, hn, cn, gates, cells = lstm_ops._forward(x, h0, c0, _layer_weights(weights, D, has_bias), D)
    return [y, hn, cn, *gates, *cells]


@lstm_layer.register_fake
def _(x, h0, c0, weights, D, has_bias):
    T, B, _ = x.shape
    H = h0.shape[2]
    return [
        x.new_empty(T, B, D * H),
        x.new_empty(D, B, H),
        x.new_empty(D, B, H),
        *[x.new_empty(T, B, 4 * H) for _ in range(D)],
        *[x.new_empty(T, B, H) for _ in range(D)],
    ]


@custom_op("nnkernels::lstm_layer_backward", mutates_args=())
def lstm_layer_backward(
    dy: Optional[Tensor],
    dhn: Optional[Tensor],
    dcn: Optional[Tensor],
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    y: Tensor,
    weights: List[Tensor],
    saved: List[Tensor],
    D: int,
    has_bias: bool,
    needs: List[bool],
) -> List[Tensor]:
    """[dx, dh0, dc0, then per direction dw_ih, dw_hh, db_ih, db_hh]; unneeded ones empty."""
    w4 = _layer_weights(weights, D, has_bias)
    gates = [g.clone() for g in saved[:D]]  # the backward overwrites them
    cells = list(saved[D:])
    grads = lstm_ops._backward(dy, dhn, dcn, x, h0, c0, y, w4, gates, cells, D, needs)
    out, seen = [], set()
    for g in grads:  # b_ih and b_hh share one gradient tensor; op outputs must not alias
        out.append(x.new_empty(0) if g is None else g.clone() if id(g) in seen else g)
        seen.add(id(g))
    return out


@lstm_layer_backward.register_fake
def _(dy, dhn, dcn, x, h0, c0, y, weights, saved, D, has_bias, needs):
    per = 4 if has_bias else 2
    shapes = [x.shape, h0.shape, c0.shape]
    for d in range(D):
        w_ih, w_hh = weights[per * d], weights[per * d + 1]
        shapes += [w_ih.shape, w_hh.shape, w_ih.shape[:1], w_ih.shape[:1]]
    return [x.new_empty(s if n else (0,)) for s, n in zip(shapes, needs)]


def _lstm_setup(ctx, inputs, output):
    x, h0, c0, weights, D, has_bias = inputs
    ctx.D, ctx.has_bias = D, has_bias
    ctx.save_for_backward(x, h0, c0, output[0], *weights, *output[3:])
    ctx.n_weights = len(weights)


def _lstm_backward(ctx, grads):
    x, h0, c0, y, *rest = ctx.saved_tensors
    weights, saved = rest[: ctx.n_weights], rest[ctx.n_weights :]
    dy, dhn, dcn = grads[0], grads[1], grads[2]
    need_x, need_h, need_c, need_w = ctx.needs_input_grad[:4]  # need_w: one bool per weight
    per = 4 if ctx.has_bias else 2
    needs = [need_x, need_h, need_c]
    for d in range(ctx.D):
        mine = list(need_w[per * d : per * (d + 1)])
        needs += mine if per == 4 else [*mine, False, False]
    out = lstm_layer_backward(
        dy, dhn, dcn, x, h0, c0, y, list(weights), list(saved), ctx.D, ctx.has_bias, needs
    )
    dweights = []
    for d in range(ctx.D):
        for k in range(per):
            dweights.append(out[3 + 4 * d + k] if needs[3 + 4 * d + k] else None)
    return (
        out[0] if need_x else None,
        out[1] if need_h else None,
        out[2] if need_c else None,
        dweights,
        None,
        None,
    )


lstm_layer.register_autograd(_lstm_backward, setup_context=_lstm_setup)


def lstm(x, h0, c0, weights, D):
    """The compiled path of _autograd.lstm.lstm_layer: (y, h_n, c_n)."""
    has_bias = weights[2] is not None
    flat = [w for w in weights if w is not None]
    y, hn, cn, *_ = lstm_layer(x, h0, c0, flat, D, has_bias)
    return y, hn, cn
