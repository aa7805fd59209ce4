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
from typing import Optional

import torch
from torch import Tensor

from .. import _native as N
from ._dispatch import Function, apply, empty, primitive, recording

# --------------------------------------------------------------------------------- primitives


def _mm_out(a, b):
    if a.dim() == 3:
        return empty(a, (a.shape[0], a.shape[1], b.shape[2]))
    return empty(a, (a.shape[0], b.shape[1]))


@primitive("mm", fake=_mm_out)
def mm_kernel(a: Tensor, b: Tensor) -> Tensor:
    out = _mm_out(a, b)
    N.gemm(a, b, out)
    return out


def _linear_out(x, weight):
    return empty(x, (*x.shape[:-1], weight.shape[0]))


@primitive("linear", fake=lambda x, weight, bias: _linear_out(x, weight))
def linear_kernel(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    out = _linear_out(x, weight)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()  # the GEMM's store reads it as a vector
    N.linear(x, weight, bias, out)  # the bias is added in the GEMM's store
    return out


def _sum_rows_out(x):
    return empty(x, (x.shape[1],))


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
    and names them). Leading dims of input that do not fold into one index are copied first."""
    if input.dim() > 2 and not input.is_contiguous():
        input = input.contiguous()
    if recording(input, weight, bias):
        return apply(LinearFunction, input, weight, bias)
    return linear_kernel(input, weight, bias)


def matmul(a, b):
    """Matrix product with torch.matmul's semantics: (M, K) @ (K, N) -> (M, N); batched
    (..., M, K) @ (..., K, N) with broadcast batch dims; a 1-D operand is a row (a) or a column
    (b) vector whose dimension is dropped, as in torch."""
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
