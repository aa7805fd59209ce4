"""Benchmark the per-call cost of every op against torch, side by side (the shared harness in nnkernels.bench).

python benchmarks/bench_call_cost.py [--device cpu|cuda] [--quick] [--json FILE] [--threads N]
"""

import sys

from nnkernels.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "call_cost", *sys.argv[1:]]))
