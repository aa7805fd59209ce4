"""The only module that imports the native extension nnkernels._C.

The kernels take torch tensors directly: the extension reads dtype, device, data pointer, shape
and strides through DLPack's C exchange table (torch >= 2.9: a DLTensor filled on the stack, no
Python call) or, on older torch, one torch._C._to_dlpack capsule per tensor; it never links
libtorch. numpy arrays arrive as DLPack capsules (nnkernels.kernels). Destination-passing style:
the caller allocates every output. The extension checks every argument, follows
torch.get_num_threads() unless set_num_threads() fixed a count, launches CUDA kernels on torch's
current stream and releases the GIL while large kernels run.

Everything else in the package reaches the kernels through the names below.
"""

import torch

from . import _C

_C.register_torch(
    torch.Tensor,
    torch._C._to_dlpack,
    torch.get_num_threads,
    getattr(torch._C, "_cuda_getCurrentRawStream", None),  # absent from CPU builds of torch
)

# ------------------------------------------------------------------------- kernel entry points
# Every function a csrc/bindings/<op>.cpp registers (gemm, linear, linear_backward, sum_rows,
# conv2d_forward, ..., lstm_backward; their signatures and docs are in help(nnkernels._C)) and
# every constant (BATCH_NORM_CUDA_WORKSPACE_PER_CHANNEL).
globals().update({name: getattr(_C, name) for name in _C.entry_points + _C.constants})

# ---------------------------------------------------------------------------- machine and build
isa = _C.isa
best_isa = _C.best_isa
available_isas = _C.available_isas
set_isa = _C.set_isa
emulate_avx512_tiles = _C._emulate_avx512_tiles
set_stream_min_bytes = _C._set_stream_min_bytes
openmp = _C.openmp
cuda_compiled = _C.cuda_compiled
cuda_device_count = _C.cuda_device_count
cuda_archs = _C.cuda_archs
gemm_kernel_name = _C.gemm_kernel_name
gemm_bf16_kernel_name = _C.gemm_bf16_kernel_name
set_gemm_bf16_kernel = _C._set_gemm_bf16_kernel
fma_peak_gflops = _C.fma_peak_gflops
copy_bandwidth_gbs = _C.copy_bandwidth_gbs


def supported_dtypes(device: str, ops: str = "floating") -> list:
    """The dtypes the kernels compute on 'cpu' or 'cuda', as torch dtypes: ops "floating" those of
    every op, "logits" the inputs of cross-entropy (on CUDA also float16 / bfloat16), "gemm" the
    operands of matmul and linear (on the CPU also bfloat16). The one table lives in the extension
    (common/checks.cpp); every check and message derives from it."""
    return [getattr(torch, name) for name in _C.supported_dtypes(device, ops)]


# ------------------------------------------------------------------------------------ threads


def set_num_threads(n: int) -> None:
    """Use `n` threads in nnkernels' CPU kernels (by default they follow torch.get_num_threads())."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive int, got {n!r}")
    _C.set_num_threads(n)


def get_num_threads() -> int:
    """Threads nnkernels' CPU kernels use."""
    return _C.get_num_threads()


def follow_torch_threads() -> None:
    """Undo set_num_threads: follow torch.get_num_threads() again (the default)."""
    _C.follow_torch_threads()
