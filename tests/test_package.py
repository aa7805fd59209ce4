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
    assert nnkernels.available_isas()[0] == "baseline"
    assert _C.best_isa() == nnkernels.available_isas()[-1]
    name = _C.gemm_kernel_name("float32")
    assert name.startswith(f"sgemm_{nnkernels.isa()}_")


@pytest.mark.parametrize("isa", nnkernels.available_isas())
def test_isa_env_forces_a_path(isa):
    out, _ = _run("import nnkernels; print(nnkernels.isa())", NNKERNELS_ISA=isa)
    assert out == isa


def test_isa_env_accepts_the_old_name_of_the_baseline_path():
    out, _ = _run("import nnkernels; print(nnkernels.isa())", NNKERNELS_ISA="scalar")
    assert out == "baseline"


def test_isa_env_bad_value_warns_and_keeps_best():
    out, err = _run("import nnkernels; print(nnkernels.isa())", NNKERNELS_ISA="sse9")
    assert out == _C.best_isa()
    assert "NNKERNELS_ISA='sse9' ignored" in err


def test_threads_follow_torch_unless_set():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert nnkernels.get_num_threads() == 1
        nnkernels.functional.matmul(torch.ones(2, 2), torch.ones(2, 2))
        assert _C.get_num_threads() == 1
        nnkernels.set_num_threads(3)
        assert nnkernels.get_num_threads() == 3 and _C.get_num_threads() == 3
    finally:
        nnkernels._native.follow_torch_threads()
        torch.set_num_threads(before)
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


def test_isa_env_above_the_cpu_warns_and_keeps_best():
    if _C.best_isa() == "avx512":
        pytest.skip("this CPU runs every path")
    out, err = _run("import nnkernels; print(nnkernels.isa())", NNKERNELS_ISA="avx512")
    assert out == _C.best_isa()
    assert "not supported by this CPU" in err


def test_concurrent_calls_from_python_threads():
    """The kernels release the GIL; calls from several threads at once must not interfere (each
    calling thread owns its packing buffer)."""
    import threading

    import nnkernels.functional as NF

    shapes = [(97, 130, 71), (200, 33, 300), (5, 700, 64), (64, 64, 64)]
    inputs = [(torch.randn(m, k), torch.randn(k, n)) for m, n, k in shapes]
    want = [a.double() @ b.double() for a, b in inputs]
    errors = []

    def worker(i):
        a, b = inputs[i % len(inputs)]
        for _ in range(20):
            got = NF.matmul(a, b)
            if not torch.allclose(got.double(), want[i % len(inputs)], rtol=1e-4, atol=1e-3):
                errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_info_command():
    out, _ = _run("import sys; from nnkernels.__main__ import main; sys.exit(main(['info']))")
    assert "CPU ISA in use" in out and "GEMM micro-kernels" in out


def test_bench_command_writes_json(tmp_path):
    """The harness end to end on the smallest cases: a table on stdout, JSON with the machine."""
    import json

    path = tmp_path / "bench.json"
    out, _ = _run(
        "import sys; from nnkernels.__main__ import main; "
        f"sys.exit(main(['bench', '--quick', '--budget', '0.05', '--json', {str(path)!r}]))"
    )
    assert "speedup" in out and "geometric-mean" in out
    data = json.loads(path.read_text())
    assert data["machine"]["isa"] == _C.isa() and data["machine"]["fma_peak_gflops"]["float32"] > 0
    ops = {r["op"] for r in data["results"]}
    assert {"matmul", "linear"} <= ops
    for r in data["results"]:
        assert r["ours_ms"] > 0 and r["torch_ms"] > 0 and r["speedup"] > 0


def test_bench_rejects_unknown_ops():
    out = subprocess.run(
        [sys.executable, "-m", "nnkernels", "bench", "--ops", "conv9"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "unknown op" in out.stdout
