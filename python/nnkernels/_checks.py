"""Argument checks for the torch-facing API, raised before any kernel runs.

Messages name the argument as the user wrote it (input, weight, bias, ...), say what was expected
and what came. TypeError: wrong kind or dtype. ValueError: wrong shape, device mismatch.
NotImplementedError: something torch accepts that nnkernels does not compute.
"""

import torch

from . import _C

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32,)


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_float(x, name: str) -> None:
    """x is a tensor of a dtype and on a device the kernels compute."""
    check_tensor(x, name)
    if not (x.dtype.is_floating_point or x.dtype.is_complex):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {_dtype_name(x.dtype)}")
    dev = x.device.type
    if dev == "cpu":
        ok = _CPU_DTYPES
    elif dev == "cuda":
        if not _C.cuda_compiled():
            raise NotImplementedError(
                f"{name} is a CUDA tensor but this nnkernels build has no CUDA kernels "
                "(rebuild with nvcc on the PATH, or NNKERNELS_CUDA=ON)"
            )
        ok = _CUDA_DTYPES
    else:
        raise NotImplementedError(
            f"{name} is on device '{x.device}'; nnkernels supports cpu and cuda"
        )
    if x.dtype not in ok:
        names = " and ".join(_dtype_name(d) for d in ok)
        raise NotImplementedError(
            f"{name} has dtype {_dtype_name(x.dtype)}; nnkernels on {dev} supports {names}"
        )


def check_same(x, name: str, ref, ref_name: str) -> None:
    """x is a tensor on the same device and of the same dtype as ref (already checked)."""
    check_tensor(x, name)
    if x.device != ref.device:
        raise ValueError(
            f"{name} is on {x.device} but {ref_name} is on {ref.device}; they must be on one device"
        )
    if x.dtype != ref.dtype:
        raise TypeError(
            f"{name} has dtype {_dtype_name(x.dtype)} but {ref_name} has dtype "
            f"{_dtype_name(ref.dtype)}; they must match"
        )


def check_operands(ref, ref_name: str, *others) -> None:
    """ref is a float tensor the kernels compute on; every other (tensor, name) pair that is not
    None has ref's device and dtype. `others` alternates tensors and names."""
    check_float(ref, ref_name)
    dtype, is_cuda = ref.dtype, ref.is_cuda
    for x, name in zip(others[::2], others[1::2]):
        if x is None:
            continue
        # Fast path: attribute reads only; the full check (and its message) on any mismatch.
        if not (
            isinstance(x, torch.Tensor)
            and x.dtype is dtype
            and x.is_cuda == is_cuda
            and not x.is_meta
        ) or (is_cuda and x.device != ref.device):
            check_same(x, name, ref, ref_name)


def autocast_on(x) -> bool:
    """Whether torch.autocast is active for x's device. Under autocast torch computes matmul,
    linear, conv2d and the LSTMs in float16 / bfloat16, which nnkernels does not: those ops then
    return torch's own result rather than a float32 one (a silently different dtype)."""
    if not isinstance(x, torch.Tensor) or x.device.type not in ("cpu", "cuda"):
        return False  # the checks that follow name the argument or the device
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()
