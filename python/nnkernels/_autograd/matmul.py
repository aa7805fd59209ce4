"""Autograd Functions of the GEMM-based ops: matmul and linear.

Shapes (after nnkernels.functional has normalised the arguments):
  MatmulFunction:  a (M, K) @ b (K, N) -> (M, N), or batched a (B, M, K) @ b (B, K, N) -> (B, M, N)
  LinearFunction:  x (M, in), weight (out, in), bias (out,) or None -> x @ weight^T + bias (M, out)
  SumRowsFunction: x (M, N) -> (N,), the bias gradient of linear
Transposed operands are passed as strided views (.mT), never copied.
"""

import torch

from .. import _ops


class MatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        out = a.new_empty(
            (*a.shape[:-1], b.shape[-1]) if a.dim() == 3 else (a.shape[0], b.shape[-1])
        )
        _ops.gemm(a, b, out)
        ctx.save_for_backward(
            a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None
        )
        return out

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.saved_tensors
        da = MatmulFunction.apply(dout, b.mT) if ctx.needs_input_grad[0] else None  # (M,N)@(N,K)
        db = MatmulFunction.apply(a.mT, dout) if ctx.needs_input_grad[1] else None  # (K,M)@(M,N)
        return da, db


class SumRowsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.rows = x.shape[0]
        return _ops.sum_rows(x, x.new_empty(x.shape[1]))

    @staticmethod
    def backward(ctx, dout):
        return dout.expand(ctx.rows, dout.shape[0])


class LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        out = x.new_empty(x.shape[0], weight.shape[0])
        # The bias is added in the GEMM's store (no second pass over out).
        _ops.gemm(x, weight.mT, out, bias=None if bias is None else bias.contiguous())
        need_dx, need_dw, _ = ctx.needs_input_grad
        ctx.save_for_backward(x if need_dw else None, weight if need_dx else None)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad
        dx = MatmulFunction.apply(dout, weight) if need_dx else None  # (M,out)@(out,in)
        dw = MatmulFunction.apply(dout.mT, x) if need_dw else None  # (out,M)@(M,in)
        db = SumRowsFunction.apply(dout) if need_db else None  # (out,)
        return dx, dw, db
