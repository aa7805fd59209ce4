"""examples/: each course model trains with torch layers and with swapped nnkernels layers to the
same test accuracy (a short run here; the full runs are in the README)."""

import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("sklearn", reason="the examples need scikit-learn (the examples extra)")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script", ["mlp.py", "cnn.py", "lstm.py"])
def test_example_reaches_torchs_accuracy(script):
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--epochs", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=EXAMPLES,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"final test accuracy torch ([\d.]+), nnkernels ([\d.]+)", r.stdout)
    assert m, r.stdout
    torch_acc, ours_acc = float(m.group(1)), float(m.group(2))
    assert torch_acc > 0.3  # learning (chance: 0.1); the full runs reach 0.95-0.99
    assert abs(torch_acc - ours_acc) <= 1 / 360 + 1e-9  # at most one of 360 test images differs
    assert "swapped" in r.stdout and "left 0" in r.stdout
