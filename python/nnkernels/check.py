"""python -m nnkernels check: every op's parity with torch on this machine.

For each op and dtype: outputs and every gradient of nnkernels and of torch at that dtype are
compared with torch's float64 result on the same inputs (the rule of the test suite, DESIGN.md
section 4: ours within 8x torch's own error plus a rounding term that grows with the reduction
length), and float64 gradients go through torch.autograd.gradcheck on small shapes. Prints one
table row per op and dtype; the exit code is 1 when anything fails.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from .bench.harness import seeded


def reference_error(ours, theirs, ref, *, k=1, scale=None, mult=8.0):
    """(our max error, torch's max error, allowed error, ok) against the float64 reference: ours
    within `mult` x torch's own error plus 2 sqrt(k) eps scale (scale: max |ref| unless given);
    float64 results within 1e-9 x scale. NaN / inf must sit where the reference has them."""
    if ours is None or ours.shape != ref.shape or ours.dtype != theirs.dtype:
        return math.inf, 0.0, 0.0, False  # missing, or the wrong shape or dtype
    ours64, theirs64, ref64 = ours.double().cpu(), theirs.double().cpu(), ref.double().cpu()
    if ref64.numel() == 0:
        return 0.0, 0.0, 0.0, True
    finite = torch.isfinite(ref64)
    if not torch.equal(torch.isfinite(ours64), finite):
        return math.inf, 0.0, 0.0, False
    o, t, r = ours64[finite], theirs64[finite], ref64[finite]
    err = (o - r).abs().max().item() if r.numel() else 0.0
    torch_err = (t - r).abs().max().item() if r.numel() else 0.0
    scale = max(float(r.abs().max().item() if scale is None and r.numel() else scale or 0), 1e-30)
    if ours.dtype == torch.float64:
        allowed = 1e-9 * scale
    else:
        eps = torch.finfo(ours.dtype).eps
        allowed = mult * torch_err + 2.0 * math.sqrt(max(k, 1)) * eps * scale
    return err, torch_err, allowed, err <= allowed


@dataclasses.dataclass
class Case:
    """One op: build(dtype, device, small) -> (inputs, ours(*inputs), theirs(*inputs), k); the
    builders live beside the op's benchmark cases (nnkernels/bench/<op>.py, PARITY)."""

    op: str
    build: object


def _suite_cases():
    """Every op's parity case, from its module in nnkernels.bench (PARITY: op name -> builder)."""
    from . import bench

    return [Case(op, build) for module in bench.MODULES for op, build in module.PARITY.items()]


CASES = _suite_cases()
# bfloat16 rows run wherever supported_dtypes(device, "gemm") has bfloat16 (the CPU): every op
# takes bfloat16 there (matmul, linear and conv2d on the bfloat16 GEMM, the others on float32
# copies with float32 statistics and sums).


def _outputs_and_grads(fn, inputs, seed):
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    g = seeded(seed)
    diff = [o for o in outs if o.requires_grad]
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in diff]
    grads = torch.autograd.grad(diff, leaves, cot, allow_unused=True)
    return [o.detach() for o in outs], list(grads)  # None in place: a missing gradient fails


@dataclasses.dataclass
class Row:
    op: str
    dtype: str
    checks: int = 0
    failed: list = dataclasses.field(default_factory=list)
    max_abs: float = 0.0
    max_rel: float = 0.0
    torch_rel: float = 0.0
    gradcheck: str = "-"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and self.gradcheck in ("-", "pass")


def check_case(case: Case, dtype, device) -> Row:
    row = Row(case.op, str(dtype).replace("torch.", ""))
    t0 = time.perf_counter()
    inputs, ours, theirs, k = case.build(dtype, device, False)
    o_out, o_grad = _outputs_and_grads(ours, inputs, 11)
    t_out, t_grad = _outputs_and_grads(theirs, inputs, 11)
    r_out, r_grad = _outputs_and_grads(theirs, [x.double() for x in inputs], 11)
    names = [f"output {j}" for j in range(len(r_out))] + [f"grad {j}" for j in range(len(r_grad))]
    for name, o, t, r in zip(names, o_out + o_grad, t_out + t_grad, r_out + r_grad):
        if r is None:  # the reference has no gradient there either
            continue
        err, terr, allowed, ok = reference_error(o, t, r, k=k)
        scale = max(r.abs().max().item() if r.numel() else 0.0, 1e-30)
        row.checks += 1
        row.max_abs = max(row.max_abs, err)
        row.max_rel = max(row.max_rel, err / scale)
        row.torch_rel = max(row.torch_rel, terr / scale)
        if not ok:
            row.failed.append(f"{name}: error {err:.3g} > allowed {allowed:.3g}")
    if dtype == torch.float64:
        small, ours_small, _, _ = case.build(dtype, device, True)
        leaves = [x.detach().requires_grad_() for x in small]
        try:
            row.gradcheck = "pass" if torch.autograd.gradcheck(ours_small, leaves) else "FAIL"
        except Exception as e:  # gradcheck raises GradcheckError with the mismatch
            row.gradcheck = "FAIL"
            row.failed.append(f"gradcheck: {str(e).splitlines()[0]}")
    row.seconds = time.perf_counter() - t0
    return row


def _table(rows) -> str:
    head = [
        "op",
        "dtype",
        "checks",
        "max abs err",
        "max rel err",
        "torch rel err",
        "gradcheck",
        "result",
    ]
    body = [
        [
            r.op,
            r.dtype,
            str(r.checks),
            f"{r.max_abs:.2e}",
            f"{r.max_rel:.2e}",
            f"{r.torch_rel:.2e}",
            r.gradcheck,
            "pass" if r.ok else "FAIL",
        ]
        for r in rows
    ]
    widths = [max(len(x[j]) for x in [head, *body]) for j in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


def run(device: str = "cpu", ops=None, out=print, all_isas=False) -> int:
    """Runs the parity checks; returns the exit code (0: all pass). all_isas: on the CPU, once
    per CPU path this machine can run (avx512 / avx2 / baseline), not just the active one."""
    import nnkernels
    from nnkernels import _native

    if device == "cuda" and not nnkernels.cuda_available():
        out("check --device cuda: no CUDA GPU visible to this nnkernels build")
        return 1
    if device == "cuda":  # compare float32 with float32, as the benchmarks and tests do
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtypes = [torch.float32, torch.float64] if device == "cpu" else [torch.float32]
    # bfloat16 rows where the kernels compute bfloat16 (the CPU)
    low = [torch.bfloat16] if torch.bfloat16 in _native.supported_dtypes(device, "gemm") else []
    cases = [c for c in CASES if ops is None or c.op in ops]
    active = _native.isa()
    isas = nnkernels.available_isas()[::-1] if all_isas and device == "cpu" else [active]
    failures = 0
    try:
        for isa in isas:
            _native.set_isa(isa)
            where = f" (CPU path {isa}, {nnkernels.get_num_threads()} threads)"
            out(
                f"nnkernels {nnkernels.__version__} parity vs torch {torch.__version__} on "
                f"{device}{where if device == 'cpu' else ''}: outputs and gradients vs torch's "
                "float64 result (ours within 8x torch's own error), gradcheck in float64"
            )
            rows = [check_case(case, dtype, device) for case in cases for dtype in dtypes + low]
            out(_table(rows))
            failed = [r for r in rows if not r.ok]
            for r in failed:
                for f in r.failed:
                    out(f"FAIL {r.op} {r.dtype}: {f}")
            out(f"{len(rows) - len(failed)}/{len(rows)} op/dtype rows pass\n")
            failures += len(failed)
    finally:
        _native.set_isa(active)
    return 1 if failures else 0
