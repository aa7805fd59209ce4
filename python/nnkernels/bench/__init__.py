"""`python -m nnkernels bench`: ours vs torch, side by side, per op.

Each op has a module here (found by name, no list to edit) with `cases(device, quick) ->
list[Case]` and, for `python -m nnkernels check`, PARITY: {op name: builder of its parity case};
benchmarks/bench_<op>.py runs one suite through the same entry point.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil

import torch

import nnkernels

from . import harness

# The suites, in the order they run: the GEMM first, the per-call cost and whole models last.
_FIRST, _LAST = ("matmul", "linear"), ("call_cost", "models")
_names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "harness")
_names = (
    [n for n in _FIRST if n in _names]
    + [n for n in _names if n not in _FIRST + _LAST]
    + [n for n in _LAST if n in _names]
)
MODULES = [importlib.import_module(f"{__name__}.{n}") for n in _names]
SUITES = {n: m.cases for n, m in zip(_names, MODULES)}
for _m in MODULES:
    _m.PARITY = getattr(_m, "PARITY", {})


def _ops_arg(values):
    ops = []
    for v in values:
        ops += [s for s in v.replace(",", " ").split() if s]
    unknown = [o for o in ops if o not in SUITES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown op(s) {unknown}; choose from {sorted(SUITES)}")
    return ops


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ops",
        nargs="+",
        default=None,
        metavar="OP",
        help=f"ops to run (default: all of {', '.join(SUITES)})",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--quick", action="store_true", help="a few representative cases, about a minute"
    )
    p.add_argument("--json", metavar="FILE", help="also write the results and the machine as JSON")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for both torch and nnkernels"
    )
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per case")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16: the suites that have bfloat16 cases (models: forward and loss under "
        "torch.autocast on both sides); the others are skipped",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing, profile each case of suites that support it (models) and show "
        "the time per layer kind, ours vs torch",
    )
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the speedups as a bar chart (needs matplotlib: pip install nnkernels[plot])",
    )


def run(args) -> int:
    try:
        ops = _ops_arg(args.ops) if args.ops else list(SUITES)
    except argparse.ArgumentTypeError as e:
        print(f"nnkernels bench: {e}")
        return 2
    if args.device == "cuda" and not nnkernels.cuda_available():
        print(
            "nnkernels bench: --device cuda, but no CUDA GPU is visible or the build has no CUDA kernels"
        )
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before a long run, not after it)
        except ImportError:
            print("nnkernels bench: --plot needs matplotlib (pip install 'nnkernels[plot]')")
            return 2
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        # a path that cannot be written fails now, not after the run (which it would lose)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            print(
                f"nnkernels bench: {flag} {path}: directory {os.path.dirname(path)!r} does not exist"
            )
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
        nnkernels.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
        torch.backends.cudnn.allow_tf32 = False
    if args.profile:
        return _profile(ops, args)
    budget = args.budget or (0.6 if args.quick else 2.0)
    torch.manual_seed(0)
    info = harness.machine_info(args.device)
    results, all_cases, skipped = [], [], []
    for op in ops:
        if args.dtype == "float32":
            cases = SUITES[op](args.device, args.quick)
        elif "dtype" in inspect.signature(SUITES[op]).parameters:
            cases = SUITES[op](args.device, args.quick, dtype=args.dtype)
        else:
            harness.progress(f"[{op}] has no {args.dtype} cases: skipped")
            continue
        for i, case in enumerate(cases, 1):
            harness.progress(f"[{op} {i}/{len(cases)}] {case.name} {case.dtype} ...")
            why = _torch_fails(case)
            if why:  # nothing to compare with: say so, keep the rest of the run
                skipped.append(f"{op} {case.name} {case.dtype}: torch fails here ({why})")
                continue
            results.append(harness.run_case(case, args.device, budget))
            all_cases.append(case)
    if any(c.memory for c in all_cases):
        harness.progress("peak memory ...")
        harness.measure_memory(all_cases, results, args.device)
    print(harness.format_table(results, info))
    for line in skipped:
        print(f"skipped {line}")
    if args.json:
        harness.write_json(args.json, results, info)
        print(f"\nwrote {args.json}")
    if args.plot:
        harness.plot(args.plot, results, info)
        print(f"wrote {args.plot}")
    return 0


def _torch_fails(case) -> str | None:
    """The first line of torch's error when its side of the case cannot run on this machine
    (torch's LSTM under bfloat16 autocast with oneDNN restricted to AVX2, ...), else None."""
    try:
        case.torch()
    except RuntimeError as e:
        return str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    return None


def _profile(ops, args) -> int:
    profiled = [op for op in ops if hasattr(MODULES[_names.index(op)], "profile")]
    if not profiled:
        print(
            f"nnkernels bench: --profile supports {[n for n, m in zip(_names, MODULES) if hasattr(m, 'profile')]}"
        )
        return 2
    for op in profiled:
        mod = MODULES[_names.index(op)]
        for case in SUITES[op](args.device, args.quick):
            harness.progress(f"[{op}] profiling {case.name} ...")
            print(mod.format_profile(case.name, mod.profile(case)), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nnkernels bench", description=__doc__.splitlines()[0]
    )
    add_arguments(p)
    return run(p.parse_args(argv))
