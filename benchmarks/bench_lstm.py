"""Benchmark nnkernels lstm against torch, side by side (the shared harness in nnkernels.bench).

python benchmarks/bench_lstm.py [--device cpu|cuda] [--quick] [--json FILE] [--threads N]
"""

import sys

from nnkernels.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "lstm", *sys.argv[1:]]))
