"""python -m nnkernels {bench,check,info}"""

import argparse
import sys


def info() -> int:
    import torch

    import nnkernels
    from nnkernels import _native

    rows = [
        ("nnkernels", nnkernels.__version__),
        ("torch", torch.__version__),
        (
            "CPU ISA in use",
            f"{_native.isa()} (best: {_native.best_isa()}; available: {', '.join(_native.available_isas())})",
        ),
        (
            "GEMM micro-kernels",
            f"{_native.gemm_kernel_name('float32')}, {_native.gemm_kernel_name('float64')}",
        ),
        (
            "threads",
            f"{nnkernels.get_num_threads()} (OpenMP: {'yes' if _native.openmp() else 'no'})",
        ),
        (
            "CUDA kernels",
            f"compiled for sm_{_native.cuda_archs().replace(',', ', sm_')}"
            if _native.cuda_compiled()
            else "not compiled",
        ),
        ("visible GPUs", str(_native.cuda_device_count())),
    ]
    try:
        import numpy

        rows.append(("numpy", numpy.__version__))
    except ImportError:
        rows.append(("numpy", "not installed (optional)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    return 0


def main(argv=None) -> int:
    from nnkernels import bench

    p = argparse.ArgumentParser(prog="python -m nnkernels")
    sub = p.add_subparsers(dest="cmd", required=True)
    bench.add_arguments(sub.add_parser("bench", help="ours vs torch, side by side"))
    chk = sub.add_parser("check", help="every op's parity with torch on this machine")
    chk.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    from nnkernels.check import CASES

    ops = [c.op for c in CASES]
    chk.add_argument(
        "--ops", nargs="+", choices=ops, help=f"ops to check (default: all of {', '.join(ops)})"
    )
    chk.add_argument(
        "--all-isas", action="store_true", help="on the CPU, check every CPU path this machine has"
    )
    sub.add_parser("info", help="build and machine facts")
    args = p.parse_args(argv)
    if args.cmd == "bench":
        return bench.run(args)
    if args.cmd == "check":
        from nnkernels import check

        return check.run(args.device, args.ops, all_isas=args.all_isas)
    return info()


if __name__ == "__main__":
    sys.exit(main())
