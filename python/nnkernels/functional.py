"""torch.nn.functional twins backed by nnkernels' kernels. Same signatures, same results (within
torch's own rounding), gradients through each op's own torch.autograd.Function."""

import math

import torch

from . import _checks
from ._autograd import matmul as _mm_ops

__all__ = ["linear", "matmul"]


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix product with torch.matmul's semantics.

    (M, K) @ (K, N) -> (M, N); batched (..., M, K) @ (..., K, N) with broadcast batch dims; 1-D
    operands are treated as a row (a) or a column (b) vector and that dimension is dropped, as in
    torch. float32/float64 on CPU, float32 on CUDA.
    """
    _checks.check_operands(a, "a", b, "b")
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(
            f"matmul needs a and b to be at least 1-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.dim() == 1 and b.dim() == 1:
        _check_inner(a, b, a.shape[0], b.shape[0])
        return _mm_ops.mm(a.unsqueeze(0), b.unsqueeze(1)).reshape(())
    if a.dim() == 1:
        return matmul(a.unsqueeze(0), b).squeeze(-2)
    if b.dim() == 1:
        return matmul(a, b.unsqueeze(-1)).squeeze(-1)

    (M, K), (K2, N) = a.shape[-2:], b.shape[-2:]
    _check_inner(a, b, K, K2)
    if a.dim() == 2 and b.dim() == 2:
        return _mm_ops.mm(a, b)
    if b.dim() == 2:
        # (..., M, K) @ (K, N): fold the batch into M, one large GEMM (a view when a allows).
        rows = math.prod(a.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous when K == 0
        return _mm_ops.mm(a.reshape(rows, K), b).reshape(*a.shape[:-1], N)
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
    b3 = b.expand(*batch, K, N).reshape(nb, K, N)
    return _mm_ops.mm(a3, b3).reshape(*batch, M, N)


def _check_inner(a, b, k_a, k_b):
    if k_a != k_b:
        raise ValueError(
            f"matmul: a {tuple(a.shape)} and b {tuple(b.shape)} cannot be multiplied "
            f"(inner dimensions {k_a} and {k_b} differ)"
        )


def linear(input: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """y = input @ weight^T + bias, as torch.nn.functional.linear.

    input (*, in_features), weight (out_features, in_features), bias (out_features,) or None ->
    (*, out_features). The bias is added inside the GEMM; the leading dims of input are folded
    into the GEMM's M dimension.
    """
    _checks.check_operands(input, "input", weight, "weight", bias, "bias")
    if input.dim() == 0:
        raise ValueError("linear: input must be at least 1-D (*, in_features), got a 0-D tensor")
    if weight.dim() == 1:
        raise NotImplementedError(
            "linear: a 1-D weight (torch's vector form) is not supported; pass it as (1, in_features)"
        )
    if weight.dim() != 2:
        raise ValueError(
            f"linear: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    if input.shape[-1] != in_features:
        raise ValueError(
            f"linear: input has {input.shape[-1]} features in its last dimension (shape "
            f"{tuple(input.shape)}) but weight {tuple(weight.shape)} expects {in_features}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(
            f"linear: bias must have shape ({out_features},) to match weight "
            f"{tuple(weight.shape)}, got {tuple(bias.shape)}"
        )
    if input.dim() == 2:  # no reshape: a view would add a node to the autograd graph
        return _mm_ops.linear(input, weight, bias)
    x2 = input.reshape(math.prod(input.shape[:-1]), in_features)
    return _mm_ops.linear(x2, weight, bias).reshape(*input.shape[:-1], out_features)
