"""How an op's pieces are called: the one place that decides between eager and compiled calls.

Each op (nnkernels/ops/<op>.py) is built from *primitives* (one kernel call each, plus the
allocation of its outputs) and one torch.autograd.Function whose forward and backward call them.

- `@primitive(name, fake=...)` registers a primitive as the torch.library custom op
  nnkernels::<name> (schema from its annotations, `fake` computing its outputs' shapes and
  strides) and returns a callable that runs the function itself in eager mode and the custom op
  while torch.compile traces. The op has no autograd formula of its own: the Function holds it.
- `apply(Function, *args)` is Function.apply. Eagerly, with no torch.func transform active, it
  calls the C++ apply directly: torch's Python wrapper would bind the arguments with
  inspect.signature on every call (about 10 us), which a Function without default arguments does
  not need. While compiling (or under torch.func) it is Function.apply itself, which dynamo
  traces.
- `recording(...)`: whether autograd must record an op on these tensors.
"""

from __future__ import annotations

import functools

import torch
from torch.library import custom_op

compiling = torch.compiler.is_compiling
# Set by the models benchmark's per-layer profile: eager primitive calls then show up in
# torch.profiler as nnkernels::<name> (without it, calls outside autograd are invisible to it).
profiling = False
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def primitive(name: str, *, fake, mutates_args=(), eager=None):
    """Decorator: the primitive `fn` (its annotations give the schema), registered as the custom
    op nnkernels::<name>.

    eager (same arguments) is what eager mode runs instead of fn, where it may take shortcuts a
    functional op may not (recycled buffers, work in place on an input the op does not declare
    mutated).
    """

    def wrap(fn):
        op = custom_op(f"nnkernels::{name}", fn, mutates_args=mutates_args)
        op.register_fake(fake)
        run = eager or fn

        label = f"nnkernels::{name}"

        @functools.wraps(fn)
        def call(*args):
            if compiling():
                return op(*args)
            if profiling:
                with torch.profiler.record_function(label):
                    return run(*args)
            return run(*args)

        call.op = op  # for torch.library.opcheck and the compile tests
        return call

    return wrap


def apply(fn, *args):
    """fn.apply(*args) (fn: a torch.autograd.Function without default arguments in forward)."""
    if compiling() or _functorch_active():
        return fn.apply(*args)
    return fn.base_apply(*args)


class Function(torch.autograd.Function):
    """torch.autograd.Function whose subclasses also get `base_apply`, the C++ apply that
    torch.autograd.Function.apply wraps (see `apply`). Subclasses define forward(*args) without
    ctx, setup_context(ctx, inputs, output) and backward(ctx, *grads)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.base_apply = super(torch.autograd.Function, cls).apply


_grad_enabled = torch._C.is_grad_enabled


def recording(a, b=None, c=None) -> bool:
    """Whether autograd must record an op on these tensors (b and c may be None)."""
    return _grad_enabled() and (
        a.requires_grad
        or (b is not None and b.requires_grad)
        or (c is not None and c.requires_grad)
    )


def recording_any(tensors) -> bool:
    return _grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
