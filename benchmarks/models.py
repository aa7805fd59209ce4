"""Benchmark whole models: torch layers vs the same model after nnkernels.swap_layers, side by side
(the cases in nnkernels/bench/models.py, on the shared harness).

python benchmarks/models.py [--device cpu|cuda] [--quick] [--json FILE] [--threads N]
"""

import sys

from nnkernels.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "models", *sys.argv[1:]]))
