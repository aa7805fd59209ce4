"""The package's layering rules, checked on its sources: one module reaches the extension, and
every op module imports on its own (no import cycle held together by import order)."""

import pathlib
import re
import subprocess
import sys

PKG = pathlib.Path(__import__("nnkernels").__file__).parent
SOURCES = sorted(p for p in PKG.rglob("*.py"))


def test_only_native_imports_the_extension():
    pattern = re.compile(
        r"^\s*(from\s+(\.|nnkernels)\s+import\s+.*\b_C\b|import\s+nnkernels\._C)", re.M
    )
    users = [p.relative_to(PKG).as_posix() for p in SOURCES if pattern.search(p.read_text())]
    assert users == ["_native.py"], users


def test_op_modules_import_first():
    """Each op module, functional and kernels import into a fresh interpreter on their own (no
    import cycle held together by import order). Run side by side: each pays torch's import."""
    modules = sorted(
        f"nnkernels.ops.{p.stem}" for p in (PKG / "ops").glob("*.py") if p.stem != "__init__"
    ) + ["nnkernels.functional", "nnkernels.kernels", "nnkernels.nn", "nnkernels.swap"]
    procs = {
        m: subprocess.Popen(
            [sys.executable, "-c", f"import {m}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for m in modules
    }
    failed = {}
    for m, p in procs.items():
        _, err = p.communicate(timeout=300)
        if p.returncode:
            failed[m] = err.decode()[-2000:]
    assert not failed, failed


def test_every_module_is_exported_and_swappable():
    """nn/__init__ exports every area file's __all__; each is a torch.nn twin swap_layers knows."""
    import nnkernels.nn
    import torch
    from nnkernels.swap import TWINS

    areas = [p.stem for p in (PKG / "nn").glob("*.py") if p.stem != "__init__"]
    exported = set(nnkernels.nn.__all__)
    for area in areas:
        module = __import__(f"nnkernels.nn.{area}", fromlist=["__all__"])
        assert set(module.__all__) <= exported, area
    for name in exported:
        cls = getattr(nnkernels.nn, name)
        base = next(b for b in cls.__mro__[1:] if b.__module__.startswith("torch.nn"))
        assert issubclass(base, torch.nn.Module) and TWINS[base] is cls, name
