"""Benchmark nnkernels linear against torch, side by side (the shared harness in nnkernels.bench).

python benchmarks/bench_linear.py [--device cpu|cuda] [--quick] [--json FILE] [--threads N]
"""

import sys

from nnkernels.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "linear", *sys.argv[1:]]))
