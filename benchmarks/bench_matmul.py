"""Benchmark nnkernels matmul against torch, side by side (the shared harness in nnkernels.bench).

python benchmarks/bench_matmul.py [--device cpu|cuda] [--quick] [--json FILE] [--threads N]
"""

import sys

from nnkernels.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "matmul", *sys.argv[1:]]))
