"""The package around the kernels: import, ISA dispatch, thread count, CUDA discovery."""

import os
import subprocess
import sys

import nnkernels
import pytest
import torch
from nnkernels import _C


def _run(code, **env):
    full = dict(os.environ, **env)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip(), out.stderr


def test_version_and_isa():
    assert nnkernels.__version__
    assert nnkernels.isa() in nnkernels.available_isas()
    assert nnkernels.available_isas()[0] == "scalar"
    assert _C.best_isa() == nnkernels.available_isas()[-1]
    name = _C.gemm_kernel_name("float32")
    assert name.startswith(f"sgemm_{nnkernels.isa()}_")


@pytest.mark.parametrize("isa", nnkernels.available_isas())
def test_isa_env_forces_a_path(isa):
    out, _ = _run("import nnkernels; print(nnkernels.isa())", NNKERNELS_ISA=isa)
    assert out == isa


def test_isa_env_bad_value_warns_and_keeps_best():
    out, err = _run("import nnkernels; print(nnkernels.isa())", NNKERNELS_ISA="sse9")
    assert out == _C.best_isa()
    assert "NNKERNELS_ISA='sse9' ignored" in err


def test_threads_follow_torch_unless_set():
    import nnkernels._ops as ops

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert nnkernels.get_num_threads() == 1
        nnkernels.functional.matmul(torch.ones(2, 2), torch.ones(2, 2))
        assert _C.get_num_threads() == 1
        nnkernels.set_num_threads(3)
        assert nnkernels.get_num_threads() == 3 and _C.get_num_threads() == 3
    finally:
        ops._user_threads = None
        torch.set_num_threads(before)
        ops._sync_threads()
    assert _C.get_num_threads() == before


def test_cuda_discovery_never_fails():
    assert isinstance(nnkernels.cuda_compiled(), bool)
    assert nnkernels.cuda_available() == (nnkernels.cuda_compiled() and _C.cuda_device_count() > 0)
    if nnkernels.cuda_compiled():
        assert _C.cuda_archs()


def test_import_without_a_gpu_driver():
    """The CUDA runtime is static: the module imports and answers with no driver visible."""
    out, _ = _run("import nnkernels; print(nnkernels.cuda_available())", CUDA_VISIBLE_DEVICES="")
    assert out == "False"


def test_fma_peak_is_measured():
    assert _C.fma_peak_gflops(False, 1, 0.02) > 0.5
