"""Autograd Function of batch normalization.

x is (N, C, *); statistics are per channel over N and the spatial dims. Training uses the batch
statistics (fused kernels: one pass for statistics + normalisation, one for the gradient reduction
+ dx) and updates the running statistics in place; eval uses the running statistics (y = x * scale
+ shift). Double backward (create_graph=True) recomputes the gradient with differentiable torch ops
instead of the fused kernel, so higher-order gradients stay exact.
"""

import math

import torch
from torch.utils.dlpack import to_dlpack

from .. import _C, _ops
from .matmul import _recording


def _stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _dl(t):
    return None if t is None else to_dlpack(t)  # torch tensors only, here


def _ws(x):
    """The CUDA kernels' float64 scratch for partial sums (None on the CPU)."""
    if not x.is_cuda:
        return None
    n = x.shape[1] * _C.batch_norm_cuda_workspace_per_channel
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
    return t if t is None or xk is x else t.reshape(x.shape)


def _channel(t, c, dtype, device):
    return torch.empty(c, dtype=dtype, device=device) if t is None else t


def forward_train(x, w, b, running_mean, running_var, momentum, eps):
    """(y, save_mean, save_invstd); updates running_mean / running_var in place when given."""
    xk = as_kernel_input(x)
    c = x.shape[1]
    y = torch.empty_like(xk)
    mean = torch.empty(c, dtype=x.dtype, device=x.device)
    invstd = torch.empty_like(mean)
    _ops.sync_threads()
    _C.batch_norm_forward_train(
        _dl(xk),
        _dl(y),
        _dl(w),
        _dl(b),
        float(eps),
        float(momentum),
        _dl(mean),
        _dl(invstd),
        _dl(running_mean),
        _dl(running_var),
        _dl(_ws(x)),
        _stream(x),
    )
    return _as_shape(y, xk, x), mean, invstd


def eval_scale_shift(w, b, running_var, eps):
    """y = (x - running_mean) * scale + shift with the running statistics (C-element vectors)."""
    invstd = torch.rsqrt(running_var + eps)
    scale = invstd if w is None else w * invstd
    shift = torch.zeros_like(scale) if b is None else b
    return scale.contiguous(), shift.contiguous(), invstd


def apply(x, center, scale, shift):
    """(x - center) * scale + shift per channel (center None: 0)."""
    xk = as_kernel_input(x)
    y = torch.empty_like(xk)
    _ops.sync_threads()
    _C.batch_norm_apply(_dl(xk), _dl(y), _dl(center), _dl(scale), _dl(shift), _stream(x))
    return _as_shape(y, xk, x)


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


def _grad_buffers(dy, x, needs):
    """(xk, dyk, dx, dw, db): the kernels' views of x and dy and the outputs needs asks for."""
    xk = as_kernel_input(x)
    dyk = grad_like(dy, xk)
    c = x.shape[1]
    dx = torch.empty_like(xk) if needs[0] else None
    dw = torch.empty(c, dtype=x.dtype, device=x.device) if needs[1] else None
    db = torch.empty(c, dtype=x.dtype, device=x.device) if needs[2] else None
    _ops.sync_threads()
    return xk, dyk, dx, dw, db


def backward_train(dy, x, w, mean, invstd, needs):
    """(dx, dw, db) of a training-mode forward (batch statistics mean, invstd); each None
    unless needs[i]."""
    xk, dyk, dx, dw, db = _grad_buffers(dy, x, needs)
    _C.batch_norm_backward_train(
        _dl(dyk),
        _dl(xk),
        _dl(mean),
        _dl(invstd),
        _dl(w),
        _dl(dx),
        _dl(dw),
        _dl(db),
        _dl(_ws(x)),
        _stream(x),
    )
    return _as_shape(dx, xk, x), dw, db


def backward_eval(dy, x, w, mean, invstd, needs):
    """(dx, dw, db) of an eval-mode forward (running statistics mean, invstd): dx = dy invstd w,
    dw = sum dy xhat, db = sum dy."""
    xk, dyk, dx, dw, db = _grad_buffers(dy, x, needs)
    c = x.shape[1]
    if needs[1] or needs[2]:
        sdy = _channel(db, c, x.dtype, x.device)
        sdyx = _channel(dw, c, x.dtype, x.device)
        _C.batch_norm_backward_reduce(
            _dl(dyk),
            _dl(xk),
            _dl(mean),
            _dl(invstd),
            _dl(sdy),
            _dl(sdyx),
            _dl(_ws(x)),
            _stream(x),
        )
    if needs[0]:
        scale = invstd if w is None else (w * invstd).contiguous()
        _C.batch_norm_apply(
            _dl(dyk), _dl(dx), None, _dl(scale), _dl(torch.zeros_like(scale)), _stream(x)
        )
    return _as_shape(dx, xk, x), dw, db


class BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, running_mean, running_var, training, momentum, eps):
        ctx.training, ctx.eps = training, eps
        if training:
            y, mean, invstd = forward_train(x, w, b, running_mean, running_var, momentum, eps)
        else:
            scale, shift, invstd = eval_scale_shift(w, b, running_var, eps)
            y = apply(x, running_mean.contiguous(), scale, shift)
            mean = running_mean
        ctx.save_for_backward(x, w, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: stay differentiable
            dx, dw, db = _composite_grads(x, w, dy, ctx.training, mean, invstd, ctx.eps, needs)
            return dx, dw, db, None, None, None, None, None
        grads = (backward_train if ctx.training else backward_eval)(dy, x, w, mean, invstd, needs)
        return (*grads, None, None, None, None, None)


def batch_norm(x, running_mean, running_var, w, b, training, momentum, eps):
    if torch.compiler.is_compiling():
        return _library.batch_norm(x, running_mean, running_var, w, b, training, momentum, eps)
    if _recording(x, w, b):
        return BatchNormFunction.apply(x, w, b, running_mean, running_var, training, momentum, eps)
    if training:
        return forward_train(x, w, b, running_mean, running_var, momentum, eps)[0]
    scale, shift, _ = eval_scale_shift(w, b, running_var, eps)
    return apply(x, running_mean.contiguous(), scale, shift)


# ---------------------------------------------------------------------------- SyncBatchNorm


def _local_stats(x):
    """(count, mean, m2) of this process's batch, per channel, in float64 (zeros when empty)."""
    xk = as_kernel_input(x)
    c = x.shape[1]
    count = x.numel() // max(c, 1)
    mean = torch.zeros(c, dtype=x.dtype, device=x.device)
    m2 = torch.zeros_like(mean)
    if count > 0:
        _ops.sync_threads()
        _C.batch_norm_stats(_dl(xk), _dl(mean), _dl(m2), _dl(_ws(x)), _stream(x))
    counts = torch.full((c,), float(count), dtype=torch.float64, device=x.device)
    return torch.stack([counts, mean.double(), m2.double()])


def _combine(stats):
    """Chan et al.'s parallel combination of (count, mean, m2) rows from every process."""
    n_i, mean_i, m2_i = stats[:, 0], stats[:, 1], stats[:, 2]
    n = n_i.sum(0)
    mean = (n_i * mean_i).sum(0) / n
    m2 = (m2_i + n_i * (mean_i - mean) ** 2).sum(0)
    return n, mean, m2


class SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, running_mean, running_var, eps, momentum, group, world_size):
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
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.group, ctx.world_size, ctx.count = group, world_size, n.to(x.dtype)
        return apply(x, mean, scale.contiguous(), shift.contiguous())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        import torch.distributed as dist

        x, w, mean, invstd = ctx.saved_tensors
        xk = as_kernel_input(x)
        dyk = grad_like(dy, xk)
        c = x.shape[1]
        sums = torch.zeros(2, c, dtype=x.dtype, device=x.device)  # sum dy, sum dy * xhat
        if x.numel():
            _ops.sync_threads()
            _C.batch_norm_backward_reduce(
                _dl(dyk),
                _dl(xk),
                _dl(mean),
                _dl(invstd),
                _dl(sums[0]),
                _dl(sums[1]),
                _dl(_ws(x)),
                _stream(x),
            )
        # As torch's SyncBatchNorm: weight and bias get this process's sums (DDP averages them);
        # the input gradient uses the sums over the whole group.
        dw = sums[1].clone() if ctx.needs_input_grad[1] else None
        db = sums[0].clone() if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dist.all_reduce(sums, group=ctx.group)
            means = (sums / ctx.count).contiguous()
            dx = torch.empty_like(xk)
            if x.numel():
                _C.batch_norm_backward_apply(
                    _dl(dyk),
                    _dl(xk),
                    _dl(mean),
                    _dl(invstd),
                    _dl(w),
                    _dl(means[0]),
                    _dl(means[1]),
                    _dl(dx),
                    _stream(x),
                )
            dx = _as_shape(dx, xk, x)
        return dx, dw, db, None, None, None, None, None, None


from .. import _library  # noqa: E402  (it builds on this module)
