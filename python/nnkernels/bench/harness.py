"""The benchmark harness every op's suite runs on.

Rules (DESIGN.md section 5): ours and torch's run side by side in one process, interleaved
(A B B A ...) after warm-up; each side's time is the median of its samples; speedup is
torch_time / our_time (> 1: we are faster). Compute-bound cases report GFLOP/s and the fraction of
the measured FMA peak; memory-bound cases report GB/s and the fraction of the measured copy
bandwidth.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

import nnkernels
from nnkernels import _native


@dataclasses.dataclass
class Case:
    op: str  # "matmul", "linear", ...
    name: str  # shape and direction, e.g. "1024x1024x1024" or "256x784->300 fwd+bwd"
    dtype: str
    ours: Callable[[], object]
    torch: Callable[[], object]
    flops: float = 0.0  # per call; compute-bound cases
    bytes: float = 0.0  # per call; memory-bound cases (GB/s against the copy bandwidth)
    memory: bool = False  # also measure each side's peak extra memory per call


@dataclasses.dataclass
class Result:
    op: str
    name: str
    dtype: str
    device: str
    ours_ms: float
    torch_ms: float
    speedup: float  # torch_ms / ours_ms
    ours_rate: float  # GFLOP/s or GB/s
    torch_rate: float
    unit: str  # "GFLOP/s" or "GB/s"
    peak: float | None  # the machine's measured peak in `unit`
    ours_pct_peak: float | None
    samples: int
    ours_iqr_ms: float  # spread of our samples (interquartile range)
    torch_iqr_ms: float
    ours_peak_mb: float | None = None  # peak extra memory of one call (Case.memory)
    torch_peak_mb: float | None = None


def one_pass(call, backward: bool, wrt=(), grad_output=None):
    """The timed callable of a case: call() under torch.no_grad() (a forward pass), or call()
    followed by the gradients of its output w.r.t. `wrt` (grad_output: the output's cotangent;
    None for a scalar loss)."""
    if backward:
        return lambda: torch.autograd.grad(call(), wrt, grad_output)

    def forward():
        with torch.no_grad():
            return call()

    return forward


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(fn, inner: int, device: str) -> float:
    """Seconds per call, over `inner` back-to-back calls."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _iqr(xs):
    if len(xs) < 4:
        return max(xs) - min(xs)
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


_heap_steady = False


def steady_heap() -> None:
    """Keeps freed blocks in glibc's heap (no trimming, no mmap below 32 MiB) for the rest of the
    process. By default glibc returns big freed blocks to the OS or maps them afresh, by thresholds
    that move with the process's history, and the next call page-faults its outputs back in: at
    25 MB tensors 1-10 ms per call, different from run to run and between the two sides of a pair.
    A training loop reaches the same steady state; both sides get it."""
    global _heap_steady
    if _heap_steady:
        return
    _heap_steady = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (its maximum on 64-bit glibc)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def time_pair(ours, theirs, device: str, budget_s: float, min_samples: int = 5):
    """Interleaved medians (seconds per call) and the samples, for two callables."""
    if device == "cpu":
        steady_heap()
    for fn in (ours, theirs):  # warm-up: caches, allocator, thread pools, lazy init
        fn()
        fn()
    _sync(device)
    # Calls per sample so that a sample lasts >= 2 ms (timer and launch noise stay small).
    one = max(_time_once(ours, 1, device), _time_once(theirs, 1, device), 1e-7)
    inner = max(1, int(2e-3 / one))
    per_round = 2 * inner * one
    rounds = max(min_samples, min(200, int(budget_s / per_round)))
    a, b = [], []
    for r in range(rounds):
        first, second = ((ours, a), (theirs, b)) if r % 2 == 0 else ((theirs, b), (ours, a))
        first[1].append(_time_once(first[0], inner, device))
        second[1].append(_time_once(second[0], inner, device))
    return statistics.median(a), statistics.median(b), a, b


_peaks: dict = {}


def fma_peak_gflops(dtype: str) -> float | None:
    """Measured FMA throughput of this CPU on nnkernels' threads (cached per process). bfloat16:
    twice the float32 peak where the bfloat16 GEMM runs vdpbf16ps (two products per float32 lane
    at the FMA's rate), the float32 peak where it widens, None for AMX (not measured)."""
    if dtype == "bfloat16":
        kernel = _native.gemm_bf16_kernel_name()
        if "amx" in kernel:
            return None
        return fma_peak_gflops("float32") * (2 if "avx512bf16" in kernel else 1)
    threads = nnkernels.get_num_threads()
    key = ("fma", dtype, threads, _native.isa())
    if key not in _peaks:
        fp64 = dtype == "float64"
        _peaks[key] = max(_native.fma_peak_gflops(fp64, threads, 0.15) for _ in range(3))
    return _peaks[key]


def copy_bandwidth_gbs(device: str) -> float:
    """Measured memory bandwidth (read + written bytes per second), cached: on the CPU a copy with
    non-temporal stores on nnkernels' threads (256 MiB buffers; a copy through the cache also
    reads every destination line, a third of its traffic uncounted); on CUDA a device copy."""
    threads = nnkernels.get_num_threads()
    key = ("copy", device, threads)
    if key not in _peaks:
        if device == "cuda":
            src = torch.empty(64 * 2**20, dtype=torch.float32, device=device).fill_(1.0)
            dst = torch.empty_like(src)
            best = min(_time_once(lambda: dst.copy_(src), 1, device) for _ in range(8))
            _peaks[key] = 2 * src.numel() * 4 / best / 1e9
        else:
            _peaks[key] = _native.copy_bandwidth_gbs(512 * 2**20, 8, threads)
    return _peaks[key]


def cuda_fp32_peak_gflops() -> float | None:
    """Non-tensor-core fp32 FMA peak from the device properties, where torch reports the clock."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz = getattr(props, "clock_rate", None)
    if not clock_khz:
        return None
    fp32_lanes_per_sm = 128 if props.major >= 8 else 64
    return props.multi_processor_count * fp32_lanes_per_sm * 2 * clock_khz * 1e3 / 1e9


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise OSError(field)


_mmap_everything = False


def peak_extra_mb(fn, device: str) -> float | None:
    """Peak memory one call of fn adds above what was live before it, in MiB. CUDA: torch's
    allocator statistics. CPU (Linux, glibc): the resident-set high-water mark, reset through
    /proc/self/clear_refs, with glibc switched to mapping every block over 64 KiB afresh and
    returning freed memory at once, so that a call's allocations show in the resident set (done
    after all timing, since it changes allocation speed)."""
    global _mmap_everything
    fn()  # warm-up: persistent scratch and lazily created state are not per-call memory
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        import ctypes
        import gc

        libc = ctypes.CDLL("libc.so.6")
        if not _mmap_everything:
            libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 128 << 10)  # M_TRIM_THRESHOLD
            _mmap_everything = True
        gc.collect()
        libc.malloc_trim(0)  # free heap blocks (kept by steady_heap) back to the OS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base = _rss_kb("VmRSS")
        fn()
        return max(0, _rss_kb("VmHWM") - base) / 1024
    except (OSError, AttributeError):
        return None


def run_case(case: Case, device: str, budget_s: float) -> Result:
    ours_s, torch_s, a, b = time_pair(case.ours, case.torch, device, budget_s)
    if case.flops:
        unit, work = "GFLOP/s", case.flops
        peak = fma_peak_gflops(case.dtype) if device == "cpu" else cuda_fp32_peak_gflops()
    else:
        unit, work = "GB/s", case.bytes
        peak = copy_bandwidth_gbs(device)
    ours_rate, torch_rate = work / ours_s / 1e9, work / torch_s / 1e9
    return Result(
        op=case.op,
        name=case.name,
        dtype=case.dtype,
        device=device,
        ours_ms=ours_s * 1e3,
        torch_ms=torch_s * 1e3,
        speedup=torch_s / ours_s,
        ours_rate=ours_rate,
        torch_rate=torch_rate,
        unit=unit,
        peak=peak,
        ours_pct_peak=100.0 * ours_rate / peak if peak else None,
        samples=len(a),
        ours_iqr_ms=_iqr(a) * 1e3,
        torch_iqr_ms=_iqr(b) * 1e3,
    )


def measure_memory(cases, results, device: str) -> None:
    """Fills the peak-memory fields of results whose case asks for it (after all timing)."""
    for case, r in zip(cases, results):
        if case.memory:
            r.ours_peak_mb = peak_extra_mb(case.ours, device)
            r.torch_peak_mb = peak_extra_mb(case.torch, device)


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for cwd in (os.getcwd(), here):
        try:
            out = subprocess.run(
                ["git", "-C", cwd, "rev-parse", "--short=12", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if out.returncode == 0:
                dirty = subprocess.run(
                    ["git", "-C", cwd, "status", "--porcelain", "--untracked-files=no"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout.strip()
                return out.stdout.strip() + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu_info() -> dict:
    info = {"gpu": torch.cuda.get_device_name(), "cuda_runtime_of_torch": torch.version.cuda}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0:
            info["driver"] = out.stdout.strip().splitlines()[0].split(",")[-1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def machine_info(device: str) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": nnkernels.get_num_threads(),
        "isa": _native.isa(),
        "gemm_kernels": [_native.gemm_kernel_name("float32"), _native.gemm_kernel_name("float64")],
        "nnkernels": nnkernels.__version__,
        "commit": _git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device == "cpu":
        info["fma_peak_gflops"] = {
            dt: round(fma_peak_gflops(dt), 1) for dt in ("float32", "float64")
        }
    else:
        info.update(_gpu_info())
        info["tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def _ms(t: float) -> str:
    """Milliseconds with 3 decimals, or 3 significant digits below 0.1 ms (per-call cases)."""
    return f"{t:.3f}" if t >= 0.1 else f"{t:.3g}"


def format_table(results, info) -> str:
    head = f"nnkernels bench on {info['device']}"
    if info["device"] == "cpu":
        peak = info["fma_peak_gflops"]
        head += (
            f": {info['cpu']}, {info['threads']} threads, ISA {info['isa']} "
            f"({', '.join(info['gemm_kernels'])}), measured FMA peak {peak['float32']:.0f} GFLOP/s "
            f"fp32 / {peak['float64']:.0f} fp64"
        )
    else:
        head += f": {info.get('gpu')}, driver {info.get('driver', '?')}, TF32 {info['tf32']}"
    head += f"; torch {info['torch']}, nnkernels {info['nnkernels']} ({info['commit']})"
    cols = ["op", "case", "dtype", "ours ms", "torch ms", "speedup", "ours", "torch", "% peak"]
    with_mem = any(r.ours_peak_mb is not None for r in results)
    if with_mem:
        cols.append("peak MiB ours/torch")
    rows = []
    for r in results:
        unit = "GF/s" if r.unit == "GFLOP/s" else "GB/s"
        rows.append(
            [
                r.op,
                r.name,
                r.dtype,
                _ms(r.ours_ms),
                _ms(r.torch_ms),
                f"{r.speedup:.2f}x",
                f"{r.ours_rate:.1f} {unit}",
                f"{r.torch_rate:.1f} {unit}",
                "-" if r.ours_pct_peak is None else f"{r.ours_pct_peak:.0f}%",
            ]
        )
        if with_mem:
            rows[-1].append(
                "-" if r.ours_peak_mb is None else f"{r.ours_peak_mb:.0f} / {r.torch_peak_mb:.0f}"
            )
    widths = [
        max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)
    ]
    left = {0, 1, 2}

    def line(cells):
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    out = [head, "", line(cols), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    if results:
        geo = 1.0
        for r in results:
            geo *= r.speedup
        geo **= 1.0 / len(results)
        out += [
            "",
            f"geometric-mean speedup over {len(results)} cases: {geo:.2f}x (> 1: nnkernels faster)",
        ]
    return "\n".join(out)


def write_json(path: str, results, info) -> None:
    with open(path, "w") as f:
        json.dump(
            {"machine": info, "results": [dataclasses.asdict(r) for r in results]}, f, indent=2
        )
        f.write("\n")


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plot(path: str, results, info) -> None:
    """A horizontal bar chart of the speedups (torch time / our time, log scale), one bar per case,
    grouped by op; the 1x line marks parity."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    labels = [f"{r.op}: {r.name} ({r.dtype})" for r in results]
    speed = [r.speedup for r in results]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(results) + 1.5))
    colors = ["tab:green" if s >= 1 else "tab:red" for s in speed]
    ax.barh(range(len(results)), speed, color=colors)
    ax.set_yticks(range(len(results)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    for i, s in enumerate(speed):
        ax.text(s, i, f" {s:.2f}x", va="center", fontsize=7)
    m = info.get("machine", info)
    ax.set_xlabel("speedup over torch (torch time / nnkernels time; > 1: nnkernels faster)")
    ax.set_title(
        f"nnkernels {m.get('nnkernels', '')} vs torch {m.get('torch', '')} on "
        f"{m.get('device', '')} ({m.get('cpu', m.get('gpu', ''))}, {m.get('threads', '')} threads)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------- parity-check inputs


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def sampler(seed, dtype, device):
    """r(*shape, scale=1.0): seeded normal samples drawn in float64, then cast (every dtype sees
    the same values); r.gen is the generator (for targets)."""
    gen = seeded(seed)

    def r(*shape, scale=1.0):
        return (
            (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
        )

    r.gen = gen
    return r
