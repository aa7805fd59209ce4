"""Benchmark nnkernels cross_entropy and linear_cross_entropy against torch, side by side (the shared harness in nnkernels.bench).

python benchmarks/bench_cross_entropy.py [--device cpu|cuda] [--quick] [--json FILE] [--threads N]
"""

import sys

from nnkernels.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "cross_entropy", *sys.argv[1:]]))
