"""The GEMM-based ops: matmul and linear, with the bias gradient sum_rows.

Shapes (after the argument normalisation below):
  mm:       a (M, K) @ b (K, N) -> (M, N), or batched a (B, M, K) @ b (B, K, N) -> (B, M, N)
  linear:   x (*, in), weight (out, in), bias (out,) or None -> x @ weight^T + bias (*, out)
  sum_rows: x (M, N) -> (N,), the bias gradient of linear
Transposed operands are passed as strided views (.mT), never copied. The backward passes are
written with the same ops, so they record themselves when create_graph asks (double backward).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from .. import _native as N
from ._dispatch import Function, apply, primitive, recording

# --------------------------------------------------------------------------------- primitives


def _mm_out(a, b):
    sa, sb = a.shape, b.shape
    return a.new_empty(sa[0], sa[1], sb[2]) if len(sa) == 3 else a.new_empty(sa[0], sb[1])


@primitive("mm", fake=_mm_out)
def mm_kernel(a: Tensor, b: Tensor) -> Tensor:
    out = _mm_out(a, b)
    N.gemm(a, b, out)
    return out


def _linear_out(x, weight):
    s = x.shape
    if len(s) == 2:  # torch's Python calls are the cost here: the common case with the fewest
        return x.new_empty(s[0], weight.shape[0])
    return x.new_empty(*s[:-1], weight.shape[0])


@primitive("linear", fake=lambda x, weight, bias: _linear_out(x, weight))
def linear_kernel(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    out = _linear_out(x, weight)
    try:
        N.linear(x, weight, bias, out)  # the bias is added in the GEMM's store
    except ValueError:
        # The binding reads x's leading dims as one index and the bias as a vector: retry once with
        # copies where those do not hold (the binding names anything else that is wrong).
        xc = x if x.dim() <= 2 or x.is_contiguous() else x.contiguous()
        bc = bias if bias is None or bias.is_contiguous() else bias.contiguous()
        if xc is x and bc is bias:
            raise
        N.linear(xc, weight, bc, out)
    return out


def _linear_backward_out_fake(dout, x, weight, needs):
    k = weight.shape[1] if weight is not None else x.shape[-1]
    return (
        dout.new_empty(*dout.shape[:-1], k) if needs[0] else dout.new_empty(0),
        dout.new_empty(dout.shape[-1], k) if needs[1] else dout.new_empty(0),
        dout.new_empty(dout.shape[-1]) if needs[2] else dout.new_empty(0),
    )


@primitive("linear_backward", fake=_linear_backward_out_fake)
def linear_backward_kernel(
    dout: Tensor, x: Optional[Tensor], weight: Optional[Tensor], needs: List[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) of linear for dout (*, out) in one call: dx = dout @ weight (*, in), dw =
    dout^T @ x (out, in), db = the column sums of dout; each empty unless needs[i] (x may be None
    unless dw is needed, weight unless dx is)."""
    need_x, need_w, need_b = needs
    k = weight.shape[1] if need_x else x.shape[-1]
    dx = dout.new_empty(*dout.shape[:-1], k) if need_x else None
    dw = dout.new_empty(dout.shape[-1], k) if need_w else None
    db = dout.new_empty(dout.shape[-1]) if need_b else None
    try:
        N.linear_backward(dout, x, weight, dx, dw, db)
    except ValueError:
        # The binding reads the leading dims of dout and x as one index: retry once with copies
        # where they do not fold (it names anything else that is wrong).
        dc = dout if dout.is_contiguous() else dout.contiguous()
        xc = x if x is None or x.is_contiguous() else x.contiguous()
        if dc is dout and xc is x:
            raise
        N.linear_backward(dc, xc, weight, dx, dw, db)
    return tuple(dout.new_empty(0) if t is None else t for t in (dx, dw, db))


def _sum_rows_out(x):
    return x.new_empty(x.shape[1])


@primitive("sum_rows", fake=_sum_rows_out)
def sum_rows_kernel(x: Tensor) -> Tensor:
    out = _sum_rows_out(x)
    N.sum_rows(x, out)
    return out


# ---------------------------------------------------------------------------------- Functions


class MatmulFunction(Function):
    @staticmethod
    def forward(a, b):
        return mm_kernel(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b = inputs
        need_a, need_b = ctx.needs_input_grad
        ctx.save_for_backward(a if need_b else None, b if need_a else None)

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        da = mm(dout, b.mT) if need_a else None  # (M,N)@(N,K)
        db = mm(a.mT, dout) if need_b else None  # (K,M)@(M,N)
        return da, db


class LinearFunction(Function):
    @staticmethod
    def forward(x, weight, bias):
        return linear_kernel(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        need_x, need_w, _ = ctx.needs_input_grad
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        if not torch.is_grad_enabled():  # no graph of the backward: the three in one kernel call
            needs = [need_x, need_w, need_b]
            grads = linear_backward_kernel(dout, x, weight, needs)
            return tuple(g if n else None for g, n in zip(grads, needs))
        # create_graph: the same gradients from the differentiable ops (double backward)
        d2 = dout if dout.dim() == 2 else dout.reshape(-1, dout.shape[-1])  # (M, out)
        dx = dw = db = None
        if need_x:
            dx = mm(d2, weight)  # (M, out) @ (out, in)
            if dout.dim() != 2:
                dx = dx.reshape(*dout.shape[:-1], weight.shape[1])
        if need_w:
            x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            dw = mm(d2.mT, x2)  # (out, M) @ (M, in)
        if need_b:
            db = sum_rows(d2)
        return dx, dw, db


class SumRowsFunction(Function):
    @staticmethod
    def forward(x):
        return sum_rows_kernel(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.rows = inputs[0].shape[0]

    @staticmethod
    def backward(ctx, dout):
        return dout.expand(ctx.rows, dout.shape[0])


# ----------------------------------------------------------------- ops: record only when needed


def mm(a, b):
    """a (M, K) @ b (K, N), or batched (B, M, K) @ (B, K, N)."""
    if recording(a, b):
        return apply(MatmulFunction, a, b)
    return mm_kernel(a, b)


def sum_rows(x):
    """(N,) column sums of x (M, N)."""
    if recording(x):
        return apply(SumRowsFunction, x)
    return sum_rows_kernel(x)


def linear(input, weight, bias=None):
    """input @ weight^T + bias, as torch.nn.functional.linear (the binding checks the arguments
    and names them)."""
    if recording(input, weight, bias):
        return apply(LinearFunction, input, weight, bias)
    return linear_kernel(input, weight, bias)


def matmul(a, b):
    """Matrix product with torch.matmul's semantics: (M, K) @ (K, N) -> (M, N); batched
    (..., M, K) @ (..., K, N) with broadcast batch dims; a 1-D operand is a row (a) or a column
    (b) vector whose dimension is dropped, as in torch."""
    # 2-D @ 2-D first, with the fewest tensor attribute reads: the general path below cost 1.8 us
    # per call (2 x 2 operands, no grad, Zen 4), about a fifth of a whole 64^3 NF.matmul.
    if a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0]:
        return mm(a, b)
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(
            f"matmul needs a and b to be at least 1-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.dim() == 1 and b.dim() == 1:
        _check_inner(a, b, a.shape[0], b.shape[0])
        return mm(a.unsqueeze(0), b.unsqueeze(1)).reshape(())
    if a.dim() == 1:
        return matmul(a.unsqueeze(0), b).squeeze(-2)
    if b.dim() == 1:
        return matmul(a, b.unsqueeze(-1)).squeeze(-1)
    (M, K), (K2, Nn) = a.shape[-2:], b.shape[-2:]
    _check_inner(a, b, K, K2)
    if a.dim() == 2 and b.dim() == 2:
        return mm(a, b)
    if b.dim() == 2:
        # (..., M, K) @ (K, N): fold the batch into M, one large GEMM (a view when a allows).
        rows = math.prod(a.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous when K == 0
        return mm(a.reshape(rows, K), b).reshape(*a.shape[:-1], Nn)
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
    b3 = b.expand(*batch, K, Nn).reshape(nb, K, Nn)
    return mm(a3, b3).reshape(*batch, M, Nn)


def _check_inner(a, b, k_a, k_b):
    if k_a != k_b:
        raise ValueError(
            f"matmul: a {tuple(a.shape)} and b {tuple(b.shape)} cannot be multiplied "
            f"(inner dimensions {k_a} and {k_b} differ)"
        )
