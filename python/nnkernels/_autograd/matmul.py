"""Autograd Functions of the GEMM-based ops: matmul and linear.

Shapes (after nnkernels.functional has normalised the arguments):
  mm:       a (M, K) @ b (K, N) -> (M, N), or batched a (B, M, K) @ b (B, K, N) -> (B, M, N)
  linear:   x (M, in), weight (out, in), bias (out,) or None -> x @ weight^T + bias (M, out)
  sum_rows: x (M, N) -> (N,), the bias gradient of linear
Transposed operands are passed as strided views (.mT), never copied.

Each op is `op(...)`: it goes through its torch.autograd.Function only when autograd has to record
it (grad mode on and an input requiring grad); otherwise it calls the kernel directly, skipping the
Function's fixed cost (about 10 us in torch 2.13), which matters for small layers, for inference and
inside backward itself. Backward passes are written with these same ops, so double backward works. While torch.compile
traces, each op is the custom op of the same name in nnkernels._library instead.
"""

import torch

from .. import _ops


def _recording(a, b=None, c=None) -> bool:
    """Whether autograd must record an op on these inputs (b and c may be None)."""
    return torch.is_grad_enabled() and (
        a.requires_grad
        or (b is not None and b.requires_grad)
        or (c is not None and c.requires_grad)
    )


# ------------------------------------------------------------------------------------ matmul


def mm_shape(a, b):
    return (a.shape[0], a.shape[1], b.shape[2]) if a.dim() == 3 else (a.shape[0], b.shape[1])


def _mm_forward(a, b):
    return _ops.gemm(a, b, a.new_empty(mm_shape(a, b)))


class MatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(
            a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None
        )
        return _mm_forward(a, b)

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.saved_tensors
        da = mm(dout, b.mT) if ctx.needs_input_grad[0] else None  # (M,N)@(N,K)
        db = mm(a.mT, dout) if ctx.needs_input_grad[1] else None  # (K,M)@(M,N)
        return da, db


def mm(a, b):
    if torch.compiler.is_compiling():
        return _library.mm(a, b)
    return MatmulFunction.apply(a, b) if _recording(a, b) else _mm_forward(a, b)


# ---------------------------------------------------------------------------------- sum_rows


def _sum_rows_forward(x):
    return _ops.sum_rows(x, x.new_empty(x.shape[1]))


class SumRowsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.rows = x.shape[0]
        return _sum_rows_forward(x)

    @staticmethod
    def backward(ctx, dout):
        return dout.expand(ctx.rows, dout.shape[0])


def sum_rows(x):
    if torch.compiler.is_compiling():
        return _library.sum_rows(x)
    return (
        SumRowsFunction.apply(x)
        if torch.is_grad_enabled() and x.requires_grad
        else _sum_rows_forward(x)
    )


# ------------------------------------------------------------------------------------ linear


def _linear_forward(x, weight, bias):
    out = x.new_empty(x.shape[0], weight.shape[0])
    # The bias is added in the GEMM's store (no second pass over out).
    return _ops.gemm(x, weight, out, bias=None if bias is None else bias.contiguous(), trans_b=True)


class LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        need_dx, need_dw, _ = ctx.needs_input_grad
        ctx.save_for_backward(x if need_dw else None, weight if need_dx else None)
        return _linear_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad
        dx = mm(dout, weight) if need_dx else None  # (M,out)@(out,in)
        dw = mm(dout.mT, x) if need_dw else None  # (out,M)@(M,in)
        db = sum_rows(dout) if need_db else None  # (out,)
        return dx, dw, db


def linear(x, weight, bias):
    if torch.compiler.is_compiling():
        return _library.linear(x, weight, bias)
    if _recording(x, weight, bias):
        return LinearFunction.apply(x, weight, bias)
    return _linear_forward(x, weight, bias)


from .. import _library  # noqa: E402  (it builds on this module)
