"""Benchmark nnkernels conv2d against torch, side by side (the shared harness in nnkernels.bench).

python benchmarks/bench_conv2d.py [--device cpu|cuda] [--quick] [--json FILE] [--threads N]
"""

import sys

from nnkernels.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "conv2d", *sys.argv[1:]]))
