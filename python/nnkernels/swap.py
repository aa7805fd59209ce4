"""swap_layers / restore_layers: put nnkernels' layers into an existing model, in place, and back.

Each nnkernels.nn module subclasses its torch.nn twin and only overrides forward, so a swap
changes the class of the very module object (`module.__class__`): parameters, buffers, hooks,
training mode, device and dtype stay the same objects, an optimizer built before the swap keeps
working, and anything holding a reference to the module sees the swap. restore_layers sets the
recorded torch class back.

    report = nnkernels.swap_layers(model)                      # every supported layer
    report = nnkernels.swap_layers(model, include=[torch.nn.Linear], exclude=["head.*"])
    print(report)                                              # what changed, what did not, why
    nnkernels.restore_layers(model)
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch

from . import _native
from . import nn as _nnk

# torch class -> nnkernels twin: every class nnkernels.nn exports subclasses its torch.nn twin.
# Exact classes only: a user subclass may override forward.
TWINS = {
    next(b for b in cls.__mro__[1:] if b.__module__.startswith("torch.nn")): cls
    for cls in (getattr(_nnk, name) for name in _nnk.__all__)
}
_LOW = (torch.float16, torch.bfloat16)
_ORIGIN = "_nnkernels_swapped_from"  # instance attribute: the torch class before the swap


def _unsupported(module) -> str | None:
    """Why nnkernels cannot compute this module as configured, or None."""
    if isinstance(module, torch.nn.LSTM) and module.proj_size:
        return f"proj_size={module.proj_size} is not supported"
    for name, t in list(module.named_parameters(recurse=False)) + list(
        module.named_buffers(recurse=False)
    ):
        if t is None or not t.dtype.is_floating_point:
            continue
        dev = t.device.type
        if dev not in ("cpu", "cuda"):
            return f"{name} is on {t.device}; nnkernels runs on cpu and cuda"
        if dev == "cuda" and not _native.cuda_compiled():
            return "this nnkernels build has no CUDA kernels"
        # float16 / bfloat16 layers compute on the bfloat16 kernels or on float32 copies
        if t.dtype not in _native.supported_dtypes(dev) and t.dtype not in _LOW:
            return f"{name} is {str(t.dtype).replace('torch.', '')} on {dev}"
    return None


def _matches(names, module, patterns) -> bool:
    for p in patterns:
        if isinstance(p, str):
            if any(fnmatch.fnmatchcase(n, p) for n in names):
                return True
        elif isinstance(p, type) and isinstance(module, p):
            return True
    return False


def _patterns(value, arg):
    if value is None:
        return None
    if isinstance(value, (str, type)):
        value = [value]
    value = list(value)
    for p in value:
        if not isinstance(p, (str, type)):
            raise TypeError(
                f"{arg} takes layer types (e.g. torch.nn.Linear) or module-name patterns "
                f"(e.g. 'encoder.*'), got {p!r}"
            )
    return value


@dataclasses.dataclass
class SwapReport:
    """What swap_layers / restore_layers changed. Entries are (name, class name[, reason]); the
    root module is named '(root)'."""

    action: str  # "swapped" or "restored"
    changed: list = dataclasses.field(default_factory=list)  # (name, torch class name)
    left: list = dataclasses.field(default_factory=list)  # (name, class name, reason)

    def __str__(self) -> str:
        lines = [f"nnkernels: {self.action} {len(self.changed)} layer(s), left {len(self.left)}"]
        rows = [(n, c, self.action) for n, c in self.changed] + list(self.left)
        if rows:
            w0 = max(len(r[0]) for r in rows)
            w1 = max(len(r[1]) for r in rows)
            lines += [f"  {n.ljust(w0)}  {c.ljust(w1)}  {why}" for n, c, why in rows]
        return "\n".join(lines)

    __repr__ = __str__

    def __len__(self) -> int:
        return len(self.changed)


def _walk(model):
    """(name, every name, module) once per module; a module shared at several places in the tree
    has several names, and include / exclude patterns may match any of them."""
    names = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), (module, []))[1].append(name or "(root)")
    for module, all_names in names.values():
        yield all_names[0], all_names, module


def swap_layers(model: torch.nn.Module, include=None, exclude=None, verbose=False) -> SwapReport:
    """Replace, in place, every torch.nn.Linear, Conv2d, BatchNorm1d/2d, SyncBatchNorm,
    CrossEntropyLoss, LSTMCell and LSTM in `model` (the root included) by its nnkernels twin,
    keeping the same module, Parameter and buffer objects, training mode, device and dtype.

    include / exclude: layer types (torch.nn.Linear, ...) or fnmatch patterns on module names
    ('encoder.*', 'head'); a layer is swapped when it matches include (default: every supported
    layer) and not exclude. Layers nnkernels cannot compute as configured (a dtype or device it
    does not support, LSTM proj_size) are left alone, with the reason in the report.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    report = SwapReport("swapped")
    for name, names, module in _walk(model):
        cls = type(module)
        twin = TWINS.get(cls)
        if twin is None:
            if cls in TWINS.values():
                report.left.append((name, cls.__name__, "already an nnkernels layer"))
            elif isinstance(module, tuple(TWINS)):
                base = next(b for b in TWINS if isinstance(module, b))
                report.left.append(
                    (
                        name,
                        cls.__name__,
                        f"a subclass of torch.nn.{base.__name__} (its own forward)",
                    )
                )
            continue
        if include is not None and not _matches(names, module, include):
            report.left.append((name, cls.__name__, "not in include"))
            continue
        if exclude is not None and _matches(names, module, exclude):
            report.left.append((name, cls.__name__, "excluded"))
            continue
        why = _unsupported(module)
        if why:
            report.left.append((name, cls.__name__, why))
            continue
        module.__class__ = twin
        module.__dict__[_ORIGIN] = cls
        report.changed.append((name, cls.__name__))
    if verbose:
        print(report)
    return report


def restore_layers(model: torch.nn.Module, verbose=False) -> SwapReport:
    """Undo swap_layers: every layer it swapped gets its torch class back (same objects)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = SwapReport("restored")
    for name, _, module in _walk(model):
        cls = module.__dict__.get(_ORIGIN)
        if cls is None:
            continue
        if type(module) is not TWINS[cls]:  # changed since the swap (e.g. a parametrization)
            why = f"its class changed since the swap (now {type(module).__name__}); left as is"
            report.left.append((name, type(module).__name__, why))
            continue
        del module.__dict__[_ORIGIN]
        module.__class__ = cls
        report.changed.append((name, cls.__name__))
    if verbose:
        print(report)
    return report
