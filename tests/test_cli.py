"""python -m nnkernels {info,check,bench}: exit codes and output on a machine without a GPU."""

import re
import subprocess
import sys

import pytest
import torch
from nnkernels import check


def _run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "nnkernels", *args], capture_output=True, text=True, timeout=timeout
    )


def test_info():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    for key in ("nnkernels", "torch", "CPU ISA in use", "threads", "CUDA kernels", "numpy"):
        assert key in r.stdout


def test_check_every_op_passes():
    r = _run("check")
    assert r.returncode == 0, r.stdout + r.stderr
    for op in ("matmul", "linear", "conv2d", "batch_norm", "cross_entropy", "lstm_cell", "lstm"):
        assert f"\n{op} " in r.stdout
    # float32, float64 and bfloat16 for the 8 ops
    assert "24/24 op/dtype rows pass" in r.stdout
    for op in ("matmul", "linear", "conv2d", "batch_norm", "linear_cross_entropy", "lstm"):
        assert re.search(rf"\n{op} +bfloat16 .* pass", r.stdout), op


def test_check_every_isa():
    import nnkernels

    r = _run("check", "--all-isas", "--ops", "linear", "lstm_cell")
    assert r.returncode == 0, r.stdout + r.stderr
    for isa in nnkernels.available_isas():
        assert f"CPU path {isa}," in r.stdout
    # both in float32, float64 and bfloat16 (the GEMM's widening kernel off AVX-512)
    assert r.stdout.count("6/6 op/dtype rows pass") == len(nnkernels.available_isas())


def test_check_reports_a_failure(monkeypatch):
    """A kernel that is off by a little more than rounding must fail, and the exit code say so."""

    def wrong(dtype, device, small):
        x = torch.randn(7, 9, dtype=dtype, device=device)
        return [x], lambda x: torch.tanh(x) * (1 + 1e-4), torch.tanh, 1

    monkeypatch.setattr(check, "CASES", [check.Case("tanh", wrong)])
    lines = []
    assert check.run("cpu", out=lines.append) == 1
    text = "\n".join(lines)
    # (its bfloat16 row passes: 1e-4 is below bfloat16's rounding)
    assert "FAIL tanh float32: output 0" in text and "1/3 op/dtype rows pass" in text


def test_check_fails_a_missing_gradient(monkeypatch):
    def dropped(dtype, device, small):
        x, w, b = (torch.randn(*s, dtype=dtype) for s in ((4, 3), (2, 3), (2,)))
        ours = lambda x, w, b: torch.nn.functional.linear(x, w, b.detach())  # noqa: E731
        return [x, w, b], ours, torch.nn.functional.linear, 3

    monkeypatch.setattr(check, "CASES", [check.Case("linear", dropped)])
    lines = []
    assert check.run("cpu", out=lines.append) == 1
    assert "FAIL linear float32: grad 2" in "\n".join(lines)


def test_check_rejects_unknown_ops():
    r = _run("check", "--ops", "lienar")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_check_cuda_without_gpu_fails_cleanly():
    import nnkernels

    if nnkernels.cuda_available():
        pytest.skip("a GPU is visible")
    r = _run("check", "--device", "cuda")
    assert r.returncode == 1 and "no CUDA GPU" in r.stdout


def test_bench_quick_json_and_plot(tmp_path):
    args = ["bench", "--quick", "--ops", "linear", "lstm", "--budget", "0.05"]
    args += ["--json", str(tmp_path / "r.json")]
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", str(tmp_path / "r.png")]
    except ImportError:
        pass
    r = _run(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "LSTM(256,512) T=50 B=64 fwd+bwd" in r.stdout and "geometric-mean speedup" in r.stdout
    assert (tmp_path / "r.json").stat().st_size > 0
    if "--plot" in args:
        assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "[lstm 1/2]" in r.stderr  # progress lines on long runs


def test_bench_rejects_unknown_op():
    r = _run("bench", "--ops", "nope")
    assert r.returncode == 2 and "unknown op" in r.stdout


def test_bench_models_cases_run_and_agree():
    """Every whole-model case builds and runs once on each side; the swapped model's inference
    matches torch's (same weights, same input) within float32 rounding of a deep network."""
    import torch
    from nnkernels.bench import models

    cases = models.cases("cpu", quick=False)
    assert {c.name for c in cases} >= {"resnet18 8x3x64x64 train step", "LSTM LM T35 B20 inference"}
    for c in cases:
        assert c.flops > 0, c.name
        if c.name.endswith("inference"):
            ours, theirs = c.ours(), c.torch()
            torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3, msg=c.name)
        else:
            c.ours(), c.torch()


def test_bench_bfloat16_runs_models_under_autocast():
    """bench --dtype bfloat16: the models suite's cases under torch.autocast on both sides (the
    inference outputs in bfloat16 and within its rounding of torch's) and matmul's bfloat16 GEMM
    cases; suites without bfloat16 cases are skipped, not run in float32."""
    from nnkernels.bench import models

    cases = models.cases("cpu", quick=True, dtype="bfloat16")
    assert cases and all(c.dtype == "bfloat16" for c in cases)
    infer = [c for c in models.cases("cpu", quick=False, dtype="bfloat16") if "MLP" in c.name]
    for c in infer:
        out = c.ours()
        if c.name.endswith("inference"):
            theirs = c.torch()
            assert out.dtype == theirs.dtype == torch.bfloat16
            torch.testing.assert_close(out, theirs, rtol=2e-2, atol=2e-2)
    # matmul has bfloat16 cases (the CPU's bfloat16 GEMM); batch_norm none
    r = _run(
        "bench",
        "--dtype",
        "bfloat16",
        "--ops",
        "matmul",
        "batch_norm",
        "--quick",
        "--budget",
        "0.05",
    )
    assert r.returncode == 0, r.stderr
    assert "[batch_norm] has no bfloat16 cases: skipped" in r.stdout + r.stderr
    assert "1024x1024x1024" in r.stdout and "bfloat16" in r.stdout


def test_bench_skips_a_case_torch_cannot_run(monkeypatch, capsys):
    """A case whose torch side raises on this machine (torch's LSTM under bfloat16 autocast with
    oneDNN restricted to AVX2) is reported as skipped; the rest of the run and its JSON stay."""
    import torch
    from nnkernels import bench
    from nnkernels.bench.harness import Case

    def refuse():
        raise RuntimeError("could not create a primitive descriptor\nmore")

    x = torch.randn(8, 8)
    good = Case(
        op="matmul",
        name="ok 8",
        dtype="float32",
        ours=lambda: x @ x,
        torch=lambda: x @ x,
        flops=1024,
    )
    bad = Case(
        op="matmul",
        name="torch fails",
        dtype="float32",
        ours=lambda: x @ x,
        torch=refuse,
        flops=1024,
    )
    monkeypatch.setitem(bench.SUITES, "matmul", lambda device, quick: [bad, good])
    assert bench.main(["--ops", "matmul", "--budget", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "ok 8" in out
    assert "skipped matmul torch fails float32: torch fails here (could not create" in out


def test_bench_refuses_an_unwritable_output_before_running(tmp_path):
    """--json / --plot into a directory that does not exist: exit code 2 at once, naming it (it
    used to fail only after the whole run, losing the results)."""
    missing = tmp_path / "no" / "such"
    r = _run("bench", "--ops", "matmul", "--json", str(missing / "r.json"))
    assert r.returncode == 2 and "--json" in r.stdout and "does not exist" in r.stdout
    assert "[matmul" not in r.stderr  # nothing was timed
