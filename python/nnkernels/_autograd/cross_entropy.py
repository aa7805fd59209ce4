"""Autograd Functions of the fused softmax-cross-entropy and of linear + cross-entropy.

cross_entropy: logits (rows, C) after nnkernels.functional has moved the class dim last. One kernel
call reads each row once for the loss and, when autograd records, writes d loss / d logits right
away (already divided by the 'mean' denominator); backward only scales that buffer by grad_output,
in place (it is ours: never the caller's logits). A second backward through a retained graph
(gradcheck, jacobians) recomputes the gradient from the saved logits.

linear_cross_entropy: logits = x @ weight^T + bias are computed in chunks of rows that fit a
bounded buffer; each chunk's loss and gradient come from the same kernel (the gradient written
over the chunk's logits in place), then two GEMMs accumulate dx and dweight and a column sum
dbias. The (rows, V) logits never exist at once. With reduction 'mean' or 'sum' the gradients are
computed during the forward (grad_output is one scalar, applied in backward); with 'none' the
backward recomputes the chunks, scaling each row's gradient by its grad_output.
"""

import threading

import torch
from torch.utils.dlpack import to_dlpack

from .. import _C, _ops


def _stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _dl(t):
    return None if t is None else to_dlpack(t)


def denominator(target, num_classes, ignore_index, weight):
    """Validates class targets (every value in [0, C) or ignore_index) before any kernel reads
    memory, and returns the 'mean' denominator sum(weight[target]) over the rows that count: a
    float on the CPU, a float32 0-d tensor on CUDA (no host sync beyond the range check)."""
    if not target.is_cuda:
        return _C.cross_entropy_check_targets(_dl(target), num_classes, ignore_index, _dl(weight))
    keep = target != ignore_index
    bad = keep & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target[{i}] = {int(target[i])} is not a class index in [0, {num_classes}) nor "
            f"ignore_index ({ignore_index})"
        )
    if weight is None:
        return keep.sum().float()
    return torch.where(keep, weight.float()[target.clamp(0, num_classes - 1)], 0.0).sum()


def _grad_scale(reduction, denom):
    """(grad_scale, grad_scale_divisor) for the kernel: 1 / denominator for 'mean'."""
    if reduction != "mean":
        return 1.0, None
    if isinstance(denom, torch.Tensor):
        return 1.0, denom
    return (1.0 / denom if denom else float("inf")), None


def _reduce(loss_rows, reduction, denom):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / denom if reduction == "mean" else total


# Big CPU gradient buffers are recycled: torch's CPU allocator hands out fresh pages for every
# large tensor, and first touching a 500 MB gradient (4096 x 32000 fp32) cost this machine
# 310-1250 ms (torch.empty + fill_, 8 tries), several times the kernel. One buffer per dtype is
# kept and reused once no tensor refers to its storage any more (autograd has consumed the
# gradient); otherwise a new one is made.
_POOL_MIN_BYTES = 32 << 20
_pool = {}
_pool_lock = threading.Lock()
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _grad_buffer(x):
    n = x.numel()
    if x.is_cuda or n * x.element_size() < _POOL_MIN_BYTES or _use_count is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    with _pool_lock:
        buf = _pool.get(x.dtype)
        # held by buf and by the temporary storage object only: free
        if buf is None or buf.numel() < n or _use_count(buf.untyped_storage()._cdata) > 2:
            buf = torch.empty(n, dtype=x.dtype)
            _pool[x.dtype] = buf
        return buf[:n].view(x.shape)  # a new tensor on the storage: autograd may keep it


def rows_forward(
    x, target, soft, weight, ignore_index, reduction, smoothing, want_grad, denom, pooled=True
):
    """(loss, grad or None) for logits x (rows, C) with unit class stride. pooled: the gradient
    may go to the recycled CPU buffer (not under torch.compile, whose ops return fresh tensors)."""
    loss_rows = x.new_empty(x.shape[0])
    if want_grad:
        grad = _grad_buffer(x) if pooled else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        grad = None
    scale, divisor = _grad_scale(reduction, denom)
    if x.shape[0]:
        _ops.sync_threads()
        _C.cross_entropy_forward(
            to_dlpack(x),
            _dl(target),
            _dl(soft),
            _dl(weight),
            to_dlpack(loss_rows),
            _dl(grad),
            ignore_index,
            smoothing,
            scale,
            _dl(divisor),
            _stream(x),
        )
    return _reduce(loss_rows, reduction, denom), grad


class _Once:
    """The gradient computed during the forward: the first backward takes it (and scales it in
    place); any later backward through a retained graph (gradcheck, jacobians) recomputes."""

    __slots__ = ("grad",)

    def __init__(self, grad):
        self.grad = grad

    def take(self):
        g, self.grad = self.grad, None
        return g


def _scale_(g, grad_output, reduction):
    """g * grad_output in place; grad_output is a scalar, or one value per row for 'none'."""
    if reduction == "none":
        return g.mul_(grad_output.reshape(-1, *([1] * (g.dim() - 1))))
    if not grad_output.is_cuda and float(grad_output) == 1.0:
        return g  # loss.backward(): nothing to scale
    return g.mul_(grad_output)


class CrossEntropyFunction(torch.autograd.Function):
    """x (rows, C); target (rows,) int64 or None; soft (rows, C) or None."""

    @staticmethod
    def forward(ctx, x, target, soft, weight, ignore_index, reduction, smoothing, denom):
        args = (target, soft, weight, ignore_index, reduction, smoothing)
        loss, grad = rows_forward(x, *args, True, denom)
        ctx.buffer = _Once(grad)
        ctx.save_for_backward(x, target, soft, weight)  # references only, for a second backward
        ctx.args = (ignore_index, reduction, smoothing, denom)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        ignore_index, reduction, smoothing, denom = ctx.args
        g = ctx.buffer.take()
        if g is None:
            x, target, soft, weight = ctx.saved_tensors
            _, g = rows_forward(
                x, target, soft, weight, ignore_index, reduction, smoothing, True, denom
            )
        return _scale_(g, grad_output, reduction), None, None, None, None, None, None, None


# --------------------------------------------------------------------- linear_cross_entropy

# Logits per chunk: rows * V values, about 64 MB in float32 (the memory bound is this buffer, dx,
# and dweight, which every path must hold).
_CHUNK_VALUES = 1 << 24


def _chunk_rows(n, v):
    return max(1, min(n, _CHUNK_VALUES // max(v, 1)))


def _lce_chunks(x, w, b, target, ignore_index, smoothing, reduction, denom, need, row_scale=None):
    """Runs the chunks. need = (dx, dw, db) flags. Returns (loss, dx, dw, db); the gradients are
    those of the reduced loss (row_scale: per-row grad_output for 'none')."""
    n, v = x.shape[0], w.shape[0]
    want_grad = any(need)
    dx = torch.empty_like(x) if need[0] else None
    dw = torch.zeros_like(w) if need[1] else None
    db = torch.zeros(v, dtype=x.dtype, device=x.device) if need[2] else None
    col = torch.empty(v, dtype=x.dtype, device=x.device) if need[2] else None
    loss_rows = x.new_empty(n)
    scale, divisor = _grad_scale(reduction, denom)
    rows = _chunk_rows(n, v)
    buf = x.new_empty(rows * v)
    _ops.sync_threads()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        xc = x[r0:r1]
        logits = buf[: (r1 - r0) * v].view(r1 - r0, v)
        _ops.gemm(xc, w, logits, bias=b, trans_b=True)  # (rows, H) @ (H, V)
        dl = _dl(logits)
        _C.cross_entropy_forward(
            dl,
            _dl(target[r0:r1]),
            None,
            None,
            to_dlpack(loss_rows[r0:r1]),
            dl if want_grad else None,  # the gradient overwrites the chunk's logits
            ignore_index,
            smoothing,
            scale,
            _dl(divisor),
            _stream(x),
        )
        if not want_grad:
            continue
        if row_scale is not None:
            logits.mul_(row_scale[r0:r1, None])
        if need[0]:
            _ops.gemm(logits, w, dx[r0:r1])  # (rows, V) @ (V, H)
        if need[1]:
            _ops.gemm(logits, xc, dw, beta=1.0, trans_a=True)  # (V, rows) @ (rows, H)
        if need[2]:
            db.add_(_ops.sum_rows(logits, col))
    return _reduce(loss_rows, reduction, denom), dx, dw, db


class LinearCrossEntropyFunction(torch.autograd.Function):
    """x (N, H), w (V, H), b (V,) or None, target (N,) int64."""

    @staticmethod
    def forward(ctx, x, w, b, target, ignore_index, reduction, smoothing, denom):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        ctx.save_for_backward(x, w, b, target)
        ctx.args = (ignore_index, reduction, smoothing, denom, need)
        # 'none' has one grad_output per row: the backward recomputes the chunks with it
        early = need if reduction != "none" else (False,) * 3
        loss, *grads = _lce_chunks(
            x, w, b, target, ignore_index, smoothing, reduction, denom, early
        )
        ctx.buffer = _Once(grads if any(early) else None)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        ignore_index, reduction, smoothing, denom, need = ctx.args
        grads = ctx.buffer.take()
        if grads is None:  # 'none', or a second backward through a retained graph
            x, w, b, target = ctx.saved_tensors
            row_scale = grad_output.reshape(-1).to(x.dtype) if reduction == "none" else None
            _, *grads = _lce_chunks(
                x, w, b, target, ignore_index, smoothing, reduction, denom, need, row_scale
            )
            if row_scale is not None:
                return (*grads, None, None, None, None, None)
        dx, dw, db = (None if g is None else _scale_(g, grad_output, "sum") for g in grads)
        return dx, dw, db, None, None, None, None, None
