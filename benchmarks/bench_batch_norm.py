"""Benchmark nnkernels batch_norm against torch, side by side (the shared harness in nnkernels.bench).

python benchmarks/bench_batch_norm.py [--device cpu|cuda] [--quick] [--json FILE] [--threads N]
"""

import sys

from nnkernels.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "batch_norm", *sys.argv[1:]]))
