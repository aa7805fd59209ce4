"""Batch normalization (and SyncBatchNorm): primitives, autograd Functions, argument rules.

x is (N, C, *); statistics are per channel over N and the spatial dims. Training uses the batch
statistics (fused kernels: one pass for statistics + normalisation, one for the gradient reduction
+ dx) and updates the running statistics in place; eval uses the running statistics (y = (x -
running_mean) * scale + shift). Double backward (create_graph=True) recomputes the gradient with
differentiable torch ops instead of the fused kernel, so higher-order gradients stay exact.
SyncBatchNorm combines per-process statistics (Chan's formula) and gradient sums across a process
group; its collectives are not traced by torch.compile (a graph break).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from .. import _native as N
from ._dispatch import Function, apply, compiling, primitive, recording


def _ws(x):
    """The CUDA kernels' float64 scratch for partial sums (None on the CPU)."""
    if not x.is_cuda:
        return None
    n = x.shape[1] * N.BATCH_NORM_CUDA_WORKSPACE_PER_CHANNEL
    return torch.empty(max(n, 1), dtype=torch.float64, device=x.device)


def as_kernel_input(x):
    """The kernels see (N, C, S): the spatial dims must flatten (contiguous or channels_last). The
    CUDA kernels take contiguous or channels_last inputs only; others are copied."""
    d = x.dim()
    if d > 4:
        x = x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))
        d = 3
    if x.is_contiguous():
        return x
    if x.is_cuda:
        if d == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return x
        return x.contiguous()
    if d == 4 and x.shape[2] > 1 and x.shape[3] > 1 and x.stride(2) != x.shape[3] * x.stride(3):
        return x.contiguous()
    return x


def grad_like(dy, xk):
    """dy in the memory layout of the kernels' input xk, so that the kernels take one fast loop
    order for both (as torch does; a gradient in another layout, e.g. expanded, costs one copy)."""
    dyk = as_kernel_input(dy)
    if xk.is_contiguous():
        return dyk.contiguous()  # no copy when it already is
    if dyk.stride() == xk.stride():
        return dyk
    if xk.dim() == 4 and xk.is_contiguous(memory_format=torch.channels_last):
        return dyk.contiguous(memory_format=torch.channels_last)
    return dyk


def _as_shape(t, xk, x):
    """t (a kernel output shaped like xk) with x's shape: a view only when the kernels saw a
    reshaped x (a view output costs autograd extra work on every call)."""
    return t if xk is x else t.reshape(x.shape)


def _like_input(x):
    """An output shaped like x in the kernels' layout."""
    return torch.empty_like(as_kernel_input(x)).reshape(x.shape)


def _channels(x, n=1):
    """n per-channel vectors (C,) like x (new_empty: the cheapest allocation from Python); float32
    for a bfloat16 x (the CPU's mixed-dtype kernels keep statistics and parameters in float32)."""
    c = x.shape[1]
    if x.dtype == torch.bfloat16:
        if n == 1:
            return x.new_empty(c, dtype=torch.float32)
        return tuple(x.new_empty(c, dtype=torch.float32) for _ in range(n))
    if n == 1:
        return x.new_empty(c)
    return tuple(x.new_empty(c) for _ in range(n))


# --------------------------------------------------------------------------------- primitives


def _train_out(x, w, b, running_mean, running_var, momentum, eps):
    return _like_input(x), *_channels(x, 2)


@primitive("batch_norm_train", fake=_train_out, mutates_args=("running_mean", "running_var"))
def forward_train(
    x: Tensor,
    w: Optional[Tensor],
    b: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, batch mean, batch invstd); updates running_mean / running_var in place when given."""
    xk = as_kernel_input(x)
    y = torch.empty_like(xk)
    mean, invstd = _channels(x, 2)
    N.batch_norm_forward_train(
        xk, y, w, b, eps, momentum, mean, invstd, running_mean, running_var, _ws(x)
    )
    return _as_shape(y, xk, x), mean, invstd


def _eval_out(x, running_mean, running_var, w, b, eps, want_invstd):
    return _like_input(x), _channels(x) if want_invstd else x.new_empty(0)


@primitive("batch_norm_eval", fake=_eval_out)
def eval_kernel(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    w: Optional[Tensor],
    b: Optional[Tensor],
    eps: float,
    want_invstd: bool,
) -> tuple[Tensor, Tensor]:
    """(y, invstd (empty unless want_invstd)) of an eval-mode forward with the running statistics.
    On the CPU one kernel call forms the coefficients and normalises (and names bad per-channel
    arguments); on CUDA the coefficients are torch ops."""
    if x.is_cuda:
        scale, shift, invstd = eval_scale_shift(w, b, running_var, eps)
        y = apply_kernel(x, running_mean.contiguous(), scale, shift)
        return y, invstd if want_invstd else x.new_empty(0)
    xk = as_kernel_input(x)
    y = torch.empty_like(xk)
    invstd = _channels(x) if want_invstd else None
    N.batch_norm_eval(xk, y, running_mean, running_var, w, b, invstd, eps)
    return _as_shape(y, xk, x), x.new_empty(0) if invstd is None else invstd


@primitive("batch_norm_apply", fake=lambda x, center, scale, shift: _like_input(x))
def apply_kernel(x: Tensor, center: Optional[Tensor], scale: Tensor, shift: Tensor) -> Tensor:
    """(x - center) * scale + shift per channel (center None: 0)."""
    xk = as_kernel_input(x)
    y = torch.empty_like(xk)
    N.batch_norm_apply(xk, y, center, scale, shift)
    return _as_shape(y, xk, x)


def _grads_out(dy, x, w, mean, invstd, needs):
    full = (_like_input(x), *_channels(x, 2))
    return tuple(t if n else x.new_empty(0) for t, n in zip(full, needs))


@primitive("batch_norm_backward_train", fake=_grads_out)
def backward_train_kernel(
    dy: Tensor, x: Tensor, w: Optional[Tensor], mean: Tensor, invstd: Tensor, needs: List[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) of a training-mode forward (batch statistics mean, invstd); each empty unless
    needs[i]."""
    xk = as_kernel_input(x)
    dx = torch.empty_like(xk) if needs[0] else None
    dw, db = (_channels(x) if n else None for n in needs[1:])
    N.batch_norm_backward_train(grad_like(dy, xk), xk, mean, invstd, w, dx, dw, db, _ws(x))
    out = (None if dx is None else _as_shape(dx, xk, x), dw, db)
    return tuple(x.new_empty(0) if t is None else t for t in out)


@primitive("batch_norm_backward_reduce", fake=lambda dy, x, mean, invstd: _channels(x, 2))
def backward_reduce_kernel(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor
) -> tuple[Tensor, Tensor]:
    """(sum dy, sum dy * xhat) per channel."""
    xk = as_kernel_input(x)
    sdy, sdyx = _channels(x, 2)
    N.batch_norm_backward_reduce(grad_like(dy, xk), xk, mean, invstd, sdy, sdyx, _ws(x))
    return sdy, sdyx


# SyncBatchNorm's pieces (the statistics and the input gradient around its collectives).
@primitive("batch_norm_stats", fake=lambda x: _channels(x, 2))
def stats_kernel(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, m2 = sum (x - mean)^2) per channel; zeros for an empty batch."""
    mean, m2 = _channels(x, 2)
    if x.numel() // max(x.shape[1], 1):
        N.batch_norm_stats(as_kernel_input(x), mean, m2, _ws(x))
    else:
        mean.zero_(), m2.zero_()
    return mean, m2


@primitive(
    "batch_norm_backward_apply",
    fake=lambda dy, x, mean, invstd, w, mean_dy, mean_dy_xhat: _like_input(x),
)
def backward_apply_kernel(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    w: Optional[Tensor],
    mean_dy: Tensor,
    mean_dy_xhat: Tensor,
) -> Tensor:
    """dx = (dy - mean_dy - xhat * mean_dy_xhat) * invstd * w per channel."""
    xk = as_kernel_input(x)
    dx = torch.empty_like(xk)
    if x.numel():
        N.batch_norm_backward_apply(
            grad_like(dy, xk), xk, mean, invstd, w, mean_dy, mean_dy_xhat, dx
        )
    return _as_shape(dx, xk, x)


# ------------------------------------------------------------------------------------ helpers


def eval_scale_shift(w, b, running_var, eps):
    """y = (x - running_mean) * scale + shift with the running statistics (C-element vectors)."""
    invstd = torch.rsqrt(running_var + eps)
    scale = invstd if w is None else w * invstd
    shift = torch.zeros_like(scale) if b is None else b
    return scale.contiguous(), shift.contiguous(), invstd


def _composite_grads(x, w, dy, training, mean, invstd, eps, needs):
    """The backward written with differentiable torch ops (for double backward)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if training:
        mean = x.mean(dims)
        invstd = torch.rsqrt(x.var(dims, unbiased=False) + eps)
    xhat = (x - mean.view(shape)) * invstd.view(shape)
    db = dy.sum(dims)
    dw = (dy * xhat).sum(dims)
    scale = invstd if w is None else invstd * w
    if training:
        n = x.numel() / x.shape[1]
        dx = (dy - (db / n).view(shape) - xhat * (dw / n).view(shape)) * scale.view(shape)
    else:
        dx = dy * scale.view(shape)
    return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None)


def _backward_eval(dy, x, w, mean, invstd, needs):
    """(dx, dw, db) of an eval-mode forward: dx = dy invstd w, dw = sum dy xhat, db = sum dy."""
    dw = db = dx = None
    if needs[1] or needs[2]:
        db, dw = backward_reduce_kernel(dy, x, mean, invstd)
    if needs[0]:
        scale = invstd if w is None else w * invstd
        dx = apply_kernel(dy, None, scale.contiguous(), torch.zeros_like(scale))
    return dx, dw if needs[1] else None, db if needs[2] else None


# --------------------------------------------------------------------------------- Functions


class BatchNormFunction(Function):
    """Outputs (y, mean, invstd) in training, (y, invstd) in eval; the statistics are not
    differentiable outputs (the op returns y)."""

    @staticmethod
    def forward(x, w, b, running_mean, running_var, training, momentum, eps):
        if training:
            return forward_train(x, w, b, running_mean, running_var, momentum, eps)
        return eval_kernel(x, running_mean, running_var, w, b, eps, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _, running_mean, _, training, _, eps = inputs
        ctx.training, ctx.eps = training, eps
        # eval: the kernels of the backward take a contiguous mean (running_mean may be a view)
        mean, invstd = output[1:] if training else (running_mean.contiguous(), output[1])
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(x, w, mean, invstd)

    @staticmethod
    def backward(ctx, dy, *unused):
        x, w, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: stay differentiable
            grads = _composite_grads(x, w, dy, ctx.training, mean, invstd, ctx.eps, needs)
        elif ctx.training:
            grads = backward_train_kernel(dy, x, w, mean, invstd, list(needs))
            grads = tuple(g if n else None for g, n in zip(grads, needs))
        else:
            grads = _backward_eval(dy, x, w, mean, invstd, needs)
        return (*grads, None, None, None, None, None)


def _local_stats(x):
    """(count, mean, m2) of this process's batch, per channel, in float64 (zeros when empty)."""
    c = x.shape[1]
    mean, m2 = stats_kernel(x)
    counts = torch.full((c,), float(x.numel() // max(c, 1)), dtype=torch.float64, device=x.device)
    return torch.stack([counts, mean.double(), m2.double()])


def _combine(stats):
    """Chan et al.'s parallel combination of (count, mean, m2) rows from every process."""
    n_i, mean_i, m2_i = stats[:, 0], stats[:, 1], stats[:, 2]
    n = n_i.sum(0)
    mean = (n_i * mean_i).sum(0) / n
    m2 = (m2_i + n_i * (mean_i - mean) ** 2).sum(0)
    return n, mean, m2


class SyncBatchNormFunction(Function):
    """Outputs (y, mean, invstd, count): the statistics over the whole group (not differentiable;
    the op returns y)."""

    @staticmethod
    def forward(x, w, b, running_mean, running_var, eps, momentum, group, world_size):
        import torch.distributed as dist

        local = _local_stats(x)
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=group)
        n, mean, m2 = _combine(torch.stack(gathered))
        if float(n.min()) <= 1:
            raise ValueError(
                "SyncBatchNorm: expected more than 1 value per channel across the process group "
                f"when training, got {int(n.min())}"
            )
        invstd = torch.rsqrt(m2 / n + eps)
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
            if running_var is not None:
                running_var.mul_(1 - momentum).add_(momentum * (m2 / (n - 1)).to(running_var.dtype))
        mean, invstd = mean.to(x.dtype), invstd.to(x.dtype)
        scale = invstd if w is None else w * invstd
        shift = torch.zeros_like(scale) if b is None else b
        y = apply_kernel(x, mean, scale.contiguous(), shift.contiguous())
        return y, mean, invstd, n.to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w = inputs[0], inputs[1]
        ctx.group, ctx.world_size = inputs[7], inputs[8]
        _, mean, invstd, count = output
        ctx.mark_non_differentiable(mean, invstd, count)
        ctx.save_for_backward(x, w, mean, invstd, count)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, *unused):
        import torch.distributed as dist

        x, w, mean, invstd, count = ctx.saved_tensors
        c = x.shape[1]
        if x.numel():
            sums = torch.stack(backward_reduce_kernel(dy, x, mean, invstd))  # sum dy, dy * xhat
        else:
            sums = torch.zeros(2, c, dtype=x.dtype, device=x.device)
        # As torch's SyncBatchNorm: weight and bias get this process's sums (DDP averages them);
        # the input gradient uses the sums over the whole group.
        dw = sums[1].clone() if ctx.needs_input_grad[1] else None
        db = sums[0].clone() if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dist.all_reduce(sums, group=ctx.group)
            means = (sums / count).contiguous()
            dx = backward_apply_kernel(dy, x, mean, invstd, w, means[0], means[1])
        return dx, dw, db, None, None, None, None, None, None


# ------------------------------------------------------------------------------------ the ops

_CHANNEL_ARGS = ("running_mean", "running_var", "weight", "bias")


def _check_channel_args(input, tensors):
    """Shapes, dtypes and devices of the per-channel arguments, for the CUDA eval path (whose torch
    ops run before any binding could name them)."""
    c = input.shape[1]
    for t, name in zip(tensors, _CHANNEL_ARGS):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"batch_norm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
        if t.dtype != input.dtype:
            raise TypeError(
                f"{name} has dtype {str(t.dtype)[6:]} but input has dtype "
                f"{str(input.dtype)[6:]}; they must match"
            )
        if tuple(t.shape) != (c,):
            raise ValueError(
                f"batch_norm: {name} must have shape ({c},) for an input with {c} channels, got "
                f"{tuple(t.shape)}"
            )


def batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """Batch normalization, as torch.nn.functional.batch_norm (the arguments in its order)."""
    if input.dim() < 2:
        raise ValueError(f"batch_norm: input must be (N, C, *), got shape {tuple(input.shape)}")
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "batch_norm: running_mean and running_var must be given when training=False"
            )
        if input.is_cuda:  # the coefficients are torch ops there, before any binding
            _check_channel_args(input, (running_mean, running_var, weight, bias))
    if recording(input, weight, bias):
        args = (input, weight, bias, running_mean, running_var, training, momentum, eps)
        return apply(BatchNormFunction, *args)[0]
    if training:
        return forward_train(input, weight, bias, running_mean, running_var, momentum, eps)[0]
    return eval_kernel(input, running_mean, running_var, weight, bias, eps, False)[0]


def sync_batch_norm(input, weight, bias, running_mean, running_var, eps, momentum, group, world):
    """Training-mode batch norm with statistics over the process group `group` of `world` ranks."""
    if compiling():
        torch._dynamo.graph_break()  # the collectives are not traced
    args = (input, weight, bias, running_mean, running_var, eps, momentum, group, world)
    return apply(SyncBatchNormFunction, *args)[0]
