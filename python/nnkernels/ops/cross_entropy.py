"""The fused softmax-cross-entropy and linear + cross-entropy: primitives, Functions, arguments.

cross_entropy: logits (rows, C) after the class dim is moved last. One kernel call reads each row
once for the loss and, when autograd records, writes d loss / d logits right away (already
divided by the 'mean' denominator); backward only scales that buffer by grad_output (eagerly in
place: it is ours, never the caller's logits). A second backward through a retained graph
(gradcheck, jacobians) recomputes the gradient from the saved logits.

linear_cross_entropy: logits = x @ weight^T + bias are computed in chunks of rows that fit a
bounded buffer; each chunk's loss and gradient come from the same kernel (the gradient written
over the chunk's logits in place), then two GEMMs accumulate dx and dweight and a column sum
dbias. The (rows, V) logits never exist at once. With reduction 'mean' or 'sum' the gradients are
computed during the forward (grad_output is one scalar, applied in backward); with 'none' the
backward recomputes the chunks, scaling each row's gradient by its grad_output.
"""

from __future__ import annotations

import functools
import threading
from typing import List, Optional

import torch
from torch import Tensor

from .. import _native as N
from ._dispatch import Function, apply, compiling, primitive, recording

_REDUCTIONS = ("none", "mean", "sum")


def denominator(target, num_classes, ignore_index, weight):
    """Validates class targets (every value in [0, C) or ignore_index) before any kernel reads
    memory, and returns the 'mean' denominator sum(weight[target]) over the rows that count: a
    float on the CPU, a float32 0-d tensor on CUDA (no host sync beyond the range check)."""
    if not target.is_cuda:
        return N.cross_entropy_check_targets(target, num_classes, ignore_index, weight)
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
# gradient); otherwise a new one is made. Eager only: a custom op returns fresh tensors.
_POOL_MIN_BYTES = 32 << 20
_pool = {}
_pool_lock = threading.Lock()
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _grad_buffer(x, pooled):
    n = x.numel()
    if not pooled or x.is_cuda or n * x.element_size() < _POOL_MIN_BYTES or _use_count is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    with _pool_lock:
        buf = _pool.get(x.dtype)
        # held by buf and by the temporary storage object only: free
        if buf is None or buf.numel() < n or _use_count(buf.untyped_storage()._cdata) > 2:
            buf = torch.empty(n, dtype=x.dtype)
            _pool[x.dtype] = buf
        return buf[:n].view(x.shape)  # a new tensor on the storage: autograd may keep it


# --------------------------------------------------------------------------------- primitives


def _rows_out(x, target, soft, weight, ignore_index, reduction, smoothing, want_grad):
    loss = x.new_empty(x.shape[0]) if reduction == "none" else x.new_empty(())
    grad = (
        torch.empty_like(x, memory_format=torch.contiguous_format) if want_grad else x.new_empty(0)
    )
    return loss, grad


def _rows(x, target, soft, weight, ignore_index, reduction, smoothing, want_grad, eager):
    """(loss, d loss / d x) for logits x (rows, C), unit class stride. Without want_grad the
    gradient is empty for the op and None eagerly (no allocation per call); eagerly a large one
    may be the recycled buffer. On the CPU one kernel call checks the targets, computes the rows
    and reduces them; on CUDA the targets are checked and the rows reduced here, without a host
    sync for 'mean'."""
    grad = _grad_buffer(x, eager) if want_grad else None
    if not x.is_cuda:
        loss = x.new_empty(x.shape[0]) if reduction == "none" else x.new_empty(())
        N.cross_entropy_forward(
            x, target, soft, weight, loss, grad, ignore_index, smoothing, reduction
        )
    else:
        c = x.shape[1]
        denom = (
            float(x.shape[0]) if target is None else denominator(target, c, ignore_index, weight)
        )
        loss_rows = x.new_empty(x.shape[0])
        scale, divisor = _grad_scale(reduction, denom)
        if x.shape[0]:
            N.cross_entropy_forward(
                x,
                target,
                soft,
                weight,
                loss_rows,
                grad,
                ignore_index,
                smoothing,
                "none",
                scale,
                divisor,
            )
        loss = _reduce(loss_rows, reduction, denom)
    return loss, x.new_empty(0) if grad is None and not eager else grad


@primitive(
    "cross_entropy",
    fake=_rows_out,
    eager=functools.partial(_rows, eager=True),
)
def rows_kernel(
    x: Tensor,
    target: Optional[Tensor],
    soft: Optional[Tensor],
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    smoothing: float,
    want_grad: bool,
) -> tuple[Tensor, Tensor]:
    return _rows(x, target, soft, weight, ignore_index, reduction, smoothing, want_grad, False)


# Logits per chunk: rows * V values, about 64 MB in float32 (the memory bound is this buffer, dx,
# and dweight, which every path must hold).
_CHUNK_VALUES = 1 << 24


def _chunk_rows(n, v):
    return max(1, min(n, _CHUNK_VALUES // max(v, 1)))


def _lce_out(x, w, b, target, ignore_index, reduction, smoothing, need, row_scale):
    loss = x.new_empty(x.shape[0]) if reduction == "none" else x.new_empty(())
    full = (torch.empty_like(x), torch.empty_like(w), x.new_empty(w.shape[0]))
    return (loss, *(t if n else x.new_empty(0) for t, n in zip(full, need)))


@primitive("linear_cross_entropy", fake=_lce_out)
def lce_kernel(
    x: Tensor,
    w: Tensor,
    b: Optional[Tensor],
    target: Tensor,
    ignore_index: int,
    reduction: str,
    smoothing: float,
    need: List[bool],
    row_scale: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dx, dw, db) of x (N, H), w (V, H), b (V,) or None, target (N,) in chunks of rows;
    the gradients (each empty unless need[i]) are those of the reduced loss (row_scale: per-row
    grad_output for 'none')."""
    n, v = x.shape[0], w.shape[0]
    denom = denominator(target, v, ignore_index, None)
    want_grad = any(need)
    dx = torch.empty_like(x) if need[0] else None
    dw = torch.zeros_like(w) if need[1] else None
    db = torch.zeros(v, dtype=x.dtype, device=x.device) if need[2] else None
    col = torch.empty(v, dtype=x.dtype, device=x.device) if need[2] else None
    loss_rows = x.new_empty(n)
    scale, divisor = _grad_scale(reduction, denom)
    rows = _chunk_rows(n, v)
    buf = x.new_empty(rows * v)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        xc = x[r0:r1]
        logits = buf[: (r1 - r0) * v].view(r1 - r0, v)
        N.gemm(xc, w, logits, bias=b, trans_b=True)  # (rows, H) @ (H, V)
        N.cross_entropy_forward(  # the gradient overwrites the chunk's logits
            logits,
            target[r0:r1],
            None,
            None,
            loss_rows[r0:r1],
            logits if want_grad else None,
            ignore_index,
            smoothing,
            grad_scale=scale,
            grad_scale_divisor=divisor,
        )
        if not want_grad:
            continue
        if row_scale is not None:
            logits.mul_(row_scale[r0:r1, None])
        if need[0]:
            N.gemm(logits, w, dx[r0:r1])  # (rows, V) @ (V, H)
        if need[1]:
            N.gemm(logits, xc, dw, beta=1.0, trans_a=True)  # (V, rows) @ (rows, H)
        if need[2]:
            N.sum_rows(logits, col)
            db.add_(col)
    grads = (x.new_empty(0) if g is None else g for g in (dx, dw, db))
    return (_reduce(loss_rows, reduction, denom), *grads)


# ---------------------------------------------------------------------------------- Functions


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


def _keep(ctx, grads, inputs):
    """Keeps the gradients computed in the forward for backward. Eagerly on ctx, with the inputs
    saved: the first backward scales them in place, a second one recomputes. While compiling as
    saved tensors, scaled out of place."""
    if compiling():
        ctx.save_for_backward(*grads)
        ctx.buffer = None
    else:
        ctx.save_for_backward(*inputs)
        ctx.buffer = _Once(grads)


def _scaled(g, grad_output, reduction, in_place):
    if in_place:
        return _scale_(g, grad_output, reduction)
    return g * (
        grad_output.reshape(-1, *([1] * (g.dim() - 1))) if reduction == "none" else grad_output
    )


class CrossEntropyFunction(Function):
    """x (rows, C); target (rows,) int64 or None; soft (rows, C) or None. Outputs (loss, grad):
    grad is not differentiable (the op returns loss)."""

    @staticmethod
    def forward(x, target, soft, weight, ignore_index, reduction, smoothing):
        return rows_kernel(x, target, soft, weight, ignore_index, reduction, smoothing, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.opts = inputs[4:]  # ignore_index, reduction, smoothing
        ctx.mark_non_differentiable(output[1])
        _keep(ctx, (output[1],), inputs[:4])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, _):
        reduction = ctx.opts[1]
        if ctx.buffer is None:  # compiled
            (g,) = ctx.saved_tensors
            in_place = False
        else:
            (g,) = ctx.buffer.take() or (None,)
            if g is None:  # a second backward through a retained graph
                g = rows_kernel(*ctx.saved_tensors, *ctx.opts, True)[1]
            in_place = True
        return _scaled(g, grad_output, reduction, in_place), None, None, None, None, None, None


class LinearCrossEntropyFunction(Function):
    """x (N, H), w (V, H), b (V,) or None, target (N,) int64; need: which of x, w, b need a
    gradient. Outputs (loss, dx, dw, db): the gradients (not differentiable) are computed in the
    forward for 'mean' and 'sum'; for 'none' the backward recomputes the chunks."""

    @staticmethod
    def forward(x, w, b, target, ignore_index, reduction, smoothing, need):
        early = list(need) if reduction != "none" else [False] * 3
        return lce_kernel(x, w, b, target, ignore_index, reduction, smoothing, early, None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.opts, ctx.need = inputs[4:7], inputs[7]
        ctx.mark_non_differentiable(*output[1:])
        if ctx.opts[1] == "none":
            ctx.save_for_backward(*inputs[:4])
            ctx.buffer = None
        else:
            _keep(ctx, output[1:], inputs[:4])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, *_):
        reduction = ctx.opts[1]
        if reduction == "none":  # one grad_output per row: the chunks run again, scaled by it
            x = ctx.saved_tensors[0]
            row_scale = grad_output.reshape(-1).to(x.dtype)
            _, *grads = lce_kernel(*ctx.saved_tensors, *ctx.opts, list(ctx.need), row_scale)
            return (*(g if n else None for g, n in zip(grads, ctx.need)), *([None] * 5))
        if ctx.buffer is None:  # compiled
            grads, in_place = ctx.saved_tensors, False
        else:
            grads, in_place = ctx.buffer.take(), True
            if grads is None:  # a second backward through a retained graph
                _, *grads = lce_kernel(*ctx.saved_tensors, *ctx.opts, list(ctx.need), None)
        out = [
            _scaled(g, grad_output, "sum", in_place) if n else None for g, n in zip(grads, ctx.need)
        ]
        return (*out, None, None, None, None, None)


# ------------------------------------------------------------------- argument normalisation


def options(reduction, label_smoothing, ignore_index):
    """Validated reduction, label_smoothing (as a float) and ignore_index."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return float(label_smoothing)


def _class_target(target, shape):
    """target holds class indices: int64 of `shape` (the input's shape without the class dim)."""
    if target.dtype != torch.int64:
        raise TypeError(
            f"target must hold class indices as torch.int64 (or probabilities of the input's "
            f"float dtype), got dtype {target.dtype}"
        )
    ts = target.shape
    if ts != shape:
        shape = tuple(shape)
        raise ValueError(
            f"target must have shape {shape} (the input's shape without the class dim), got "
            f"{tuple(ts)}"
        )


def _same(t, name, input):
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if t.dtype != input.dtype:
        raise TypeError(
            f"{name} has dtype {str(t.dtype)[6:]} but input has dtype {str(input.dtype)[6:]}; "
            "they must match"
        )


def cross_entropy(input, target, weight, ignore_index, reduction, smoothing):
    """Softmax cross-entropy, as torch.nn.functional.cross_entropy (smoothing checked by
    options()). input: (C,), (N, C) or (N, C, d1, ...) logits; target: class indices (int64) of
    the input's shape without the class dim, or class probabilities of input's shape and dtype;
    weight (C,) or None. 'mean' divides by the summed weights of the targets that count (the batch
    size for probability targets), as torch does. Devices, strides and the class indices
    themselves are checked by the binding."""
    nd = input.dim()
    if nd == 0:
        raise ValueError("input must have at least 1 dim (C,), got a 0-d tensor")
    if not input.dtype.is_floating_point:
        raise TypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
    unbatched = nd == 1
    if unbatched:
        input, target, nd = input.unsqueeze(0), target.unsqueeze(0), 2
    c = input.shape[1]
    soft = target.dtype.is_floating_point
    if soft:
        if target.shape != input.shape:
            raise ValueError(
                f"target of probabilities must have the input's shape {tuple(input.shape)}, got "
                f"{tuple(target.shape)}"
            )
        _same(target, "target", input)
        if target.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                "target (probabilities) requires grad: nnkernels computes the gradient of input only"
            )
    else:
        xs = input.shape
        _class_target(target, xs[:1] + xs[2:])
        if c == 0 and input.shape[0] > 0:
            raise ValueError("input has 0 classes")
    if weight is not None:
        _same(weight, "weight", input)
        if tuple(weight.shape) != (c,):
            raise ValueError(
                f"weight must have shape ({c},) for an input with {c} classes, got "
                f"{tuple(weight.shape)}"
            )
        if weight.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError("weight requires grad: cross_entropy has no weight gradient")
        weight = weight.contiguous()

    # rows (N * d1 * ..., C) with unit class stride; the gradient comes back in input's shape
    x = input if nd == 2 else input.movedim(1, -1).reshape(-1, c)
    if c > 1 and x.stride(1) != 1:
        x = x.contiguous()
    if soft:
        t2 = target if nd == 2 else target.movedim(1, -1).reshape(-1, c)
        probs, hard = t2 if c <= 1 or t2.stride(1) == 1 else t2.contiguous(), None
    else:
        hard = target if nd == 2 else target.reshape(-1)
        probs = None
        if not hard.is_contiguous():
            hard = hard.contiguous()
    args = (hard, probs, weight, ignore_index, reduction, smoothing)
    if recording(input):
        loss = apply(CrossEntropyFunction, x, *args)[0]
    else:
        loss = rows_kernel(x, *args, False)[0]
    if reduction == "none":
        loss = loss.reshape(target.shape[:1] + target.shape[2:] if soft else target.shape)
        if unbatched:
            loss = loss.squeeze(0)
    return loss


def linear_cross_entropy(input, weight, target, bias, ignore_index, reduction, smoothing):
    """cross_entropy(linear(input, weight, bias), target, ...) without the full logits: input
    (*, H), weight (V, H), bias (V,) or None, target (*) class indices (int64)."""
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
    _class_target(target, input.shape[:-1])
    x = input.reshape(-1, h)
    t = target.reshape(-1).contiguous()
    args = (ignore_index, reduction, smoothing)
    if recording(input, weight, bias):
        need = [input.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]
        loss = apply(LinearCrossEntropyFunction, x, weight, bias, t, *args, need)[0]
    else:
        loss = lce_kernel(x, weight, bias, t, *args, [False] * 3, None)[0]
    return loss.reshape(target.shape) if reduction == "none" else loss
