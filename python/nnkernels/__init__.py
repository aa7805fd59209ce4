"""nnkernels: hand-written CPU (AVX-512/AVX2 + OpenMP) and CUDA kernels for the core layers of
neural networks, as drop-in PyTorch ops.

    import nnkernels
    import nnkernels.functional as NF
    y = NF.linear(x, w, b)             # same signature as torch.nn.functional.linear
    layer = nnkernels.nn.Linear(784, 300)
"""

import os as _os
import warnings as _warnings

import torch as _torch  # noqa: F401  (first: the extension then shares torch's OpenMP runtime)

from . import _native

__version__ = "0.1.0"

_isa_env = _os.environ.get("NNKERNELS_ISA", "").strip().lower()
if _isa_env:
    try:
        _native.set_isa(_isa_env)
    except ValueError as _e:
        _warnings.warn(f"NNKERNELS_ISA={_isa_env!r} ignored: {_e}", RuntimeWarning, stacklevel=2)

from . import functional, kernels, nn  # noqa: E402
from ._native import get_num_threads, set_num_threads  # noqa: E402
from .swap import SwapReport, restore_layers, swap_layers  # noqa: E402


def isa() -> str:
    """The CPU code path in use: 'avx512', 'avx2' or 'baseline' (no ISA flags: 16-byte vectors,
    SSE2 on x86-64, NEON on aarch64), chosen at import from cpuid; NNKERNELS_ISA=avx2|baseline
    forces a lower one ('scalar' is accepted for 'baseline')."""
    return _native.isa()


def available_isas() -> list:
    """Every CPU path this machine can run, lowest first."""
    return _native.available_isas()


def cuda_compiled() -> bool:
    """Whether this build contains the CUDA kernels."""
    return _native.cuda_compiled()


def cuda_available() -> bool:
    """Whether the CUDA kernels are built and a GPU is visible."""
    return _native.cuda_compiled() and _native.cuda_device_count() > 0


__all__ = [
    "functional",
    "kernels",
    "nn",
    "isa",
    "available_isas",
    "cuda_available",
    "cuda_compiled",
    "get_num_threads",
    "set_num_threads",
    "swap_layers",
    "restore_layers",
    "SwapReport",
    "__version__",
]
