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
import torch.nn.functional as F

from . import functional as NF


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
    """One op: build(dtype, device, small) -> (inputs, ours(*inputs), theirs(*inputs), k)."""

    op: str
    build: object


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _sampler(seed, dtype, device):
    """r(*shape, scale=1.0): seeded normal samples drawn in float64, then cast (every dtype sees
    the same values); r.gen is the generator (for targets)."""
    gen = _g(seed)

    def r(*shape, scale=1.0):
        return (
            (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
        )

    r.gen = gen
    return r


def _matmul(dtype, device, small):
    r = _sampler(1, dtype, device)
    m, k, n = (3, 4, 5) if small else (129, 65, 77)
    a, b = r(m, k), r(k, n)
    return [a, b], NF.matmul, torch.matmul, k


def _linear(dtype, device, small):
    r = _sampler(2, dtype, device)
    m, i, o = (3, 4, 5) if small else (64, 100, 30)
    x, w = r(m, i), r(o, i)
    b = r(o)
    return [x, w, b], NF.linear, F.linear, i


def _conv2d(dtype, device, small):
    r = _sampler(3, dtype, device)
    n, c, h, k = (1, 2, 5, 3) if small else (4, 3, 17, 8)
    x = r(n, c, h, h)
    w = r(k, c, 3, 3)
    b = r(k)
    kw = dict(stride=2, padding=1)
    return (
        [x, w, b],
        lambda x, w, b: NF.conv2d(x, w, b, **kw),
        lambda x, w, b: F.conv2d(x, w, b, **kw),
        c * 9 * n * h * h,
    )


def _batch_norm(dtype, device, small):
    r = _sampler(4, dtype, device)
    n, c, h = (3, 2, 2) if small else (8, 6, 9)
    x = r(n, c, h, h, scale=2.0) + 3
    w, b = r(c), r(c)

    def run(fn):
        def f(x, w, b):
            rm, rv = x.new_zeros(c), x.new_ones(c)
            y = fn(x, rm, rv, w, b, training=True)
            return y, rm, rv

        return f

    return [x, w, b], run(NF.batch_norm), run(F.batch_norm), n * h * h


def _cross_entropy(dtype, device, small):
    r = _sampler(5, dtype, device)
    n, c = (4, 5) if small else (64, 100)
    x = r(n, c, scale=3.0)
    t = torch.randint(0, c, (n,), generator=r.gen).to(device)
    kw = dict(label_smoothing=0.1)
    return [x], lambda x: NF.cross_entropy(x, t, **kw), lambda x: F.cross_entropy(x, t, **kw), c


def _linear_cross_entropy(dtype, device, small):
    r = _sampler(6, dtype, device)
    n, h, v = (4, 3, 5) if small else (64, 32, 100)
    x, w = r(n, h), r(v, h)
    t = torch.randint(0, v, (n,), generator=r.gen).to(device)
    return (
        [x, w],
        lambda x, w: NF.linear_cross_entropy(x, w, t),
        lambda x, w: F.cross_entropy(F.linear(x, w), t),
        h * v,
    )


def _lstm_cell(dtype, device, small):
    r = _sampler(7, dtype, device)
    b, i, h = (2, 3, 4) if small else (5, 7, 9)
    args = [r(b, i)]
    args += [r(b, h) for _ in range(2)]
    args += [r(4 * h, i, scale=0.3)]
    args += [r(4 * h, h, scale=0.3)]
    args += [r(4 * h) for _ in range(2)]

    def ours(x, h, c, *w):
        return NF.lstm_cell(x, (h, c), *w)

    def theirs(x, h, c, *w):
        return torch.lstm_cell(x, (h, c), *w)

    return args, ours, theirs, i + h


def _lstm(dtype, device, small):
    r = _sampler(8, dtype, device)
    t, b, i, h = (3, 2, 2, 3) if small else (6, 3, 5, 7)
    sizes = []
    for layer in range(2):
        for _ in range(2):
            inp = i if layer == 0 else 2 * h
            sizes += [(4 * h, inp), (4 * h, h), (4 * h,), (4 * h,)]
    params = [r(*s, scale=0.3) for s in sizes]
    x = r(t, b, i)
    h0 = r(4, b, h)
    c0 = r(4, b, h)

    def ours(x, h0, c0, *p):
        out, (hn, cn) = NF.lstm(x, (h0, c0), list(p), True, 2, 0.0, True, True, False)
        return out, hn, cn

    def theirs(x, h0, c0, *p):  # torch.lstm returns (out, h_n, c_n)
        return torch.lstm(x, (h0, c0), list(p), True, 2, 0.0, True, True, False)

    return [x, h0, c0, *params], ours, theirs, t * b + i + 4 * h


CASES = [
    Case("matmul", _matmul),
    Case("linear", _linear),
    Case("conv2d", _conv2d),
    Case("batch_norm", _batch_norm),
    Case("cross_entropy", _cross_entropy),
    Case("linear_cross_entropy", _linear_cross_entropy),
    Case("lstm_cell", _lstm_cell),
    Case("lstm", _lstm),
]


def _outputs_and_grads(fn, inputs, seed):
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    g = _g(seed)
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
            rows = [check_case(case, dtype, device) for case in cases for dtype in dtypes]
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
