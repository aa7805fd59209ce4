"""nnkernels.functional.cross_entropy / nn.CrossEntropyLoss and linear_cross_entropy against torch:
loss and input gradient over every option combination (class and probability targets, weights,
ignore_index, label smoothing, reductions), (N, C), (N, C, d...) and unbatched inputs, strided
logits, every CPU path, thread splits, large and infinite logits, NaN, gradcheck, bad input, and
that the caller's logits are never written."""

import itertools

import nnkernels
import nnkernels.functional as NF
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference
from nnkernels.ops import cross_entropy as ce_ops

SHAPES = [(1, 1), (1, 7), (17, 129), (5, 1000), (3, 4099), (0, 5), (4, 3, 5), (2, 6, 3, 4)]
OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(weight=True),
    dict(weight=True, label_smoothing=0.2, reduction="none"),
    dict(ignore=True),
    dict(ignore=True, weight=True, label_smoothing=0.3),
    dict(ignore=True, reduction="sum", label_smoothing=0.05),
]


def _inputs(shape, opts, *, soft=False, dtype=torch.float32, scale=3.0):
    torch.manual_seed(11)
    c = shape[1]
    x = torch.randn(*shape, dtype=torch.float64) * scale
    tshape = (shape[0], *shape[2:])
    if soft:
        t = torch.softmax(torch.randn(*shape, dtype=torch.float64) * 2, dim=1)
    else:
        t = torch.randint(0, max(c, 1), tshape)
        if opts.get("ignore") and t.numel():
            t.view(-1)[::3] = -7
    w = torch.rand(c, dtype=torch.float64) + 0.25 if opts.get("weight") else None
    kw = dict(
        reduction=opts.get("reduction", "mean"), label_smoothing=opts.get("label_smoothing", 0.0)
    )
    if opts.get("ignore"):
        kw["ignore_index"] = -7
    cast = (lambda v: v.to(dtype)) if soft else (lambda v: v)
    return x.to(dtype), cast(t), None if w is None else w.to(dtype), kw


def _matches(ours, theirs, ref, *, k, name, scale=None):
    """The reference rule, with NaN required exactly where torch's float64 result has NaN."""
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(ours).cpu(), nan.cpu()), f"{name}: NaN positions differ"
    zero = lambda v: v.masked_fill(nan.to(v.device), 0)  # noqa: E731
    if scale is not None:
        scale = max(scale, zero(ref).abs().max().item() if ref.numel() else 0.0)
    assert_matches_reference(zero(ours), zero(theirs), zero(ref), k=k, name=name, scale=scale)


def _check(fn_ours, fn_torch, x, t, w, kw, *, k):
    """Loss and input gradient of ours vs torch's own result, against torch in float64."""
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    x64 = x.detach().double().requires_grad_()
    t64 = t.double() if t.dtype.is_floating_point else t
    w64 = None if w is None else w.double()
    ours = fn_ours(xs[0], t, weight=w, **kw)
    theirs = fn_torch(xs[1], t, weight=w, **kw)
    ref = fn_torch(x64, t64, weight=w64, **kw)
    _matches(ours.detach(), theirs.detach(), ref.detach(), k=k, name="loss")
    g = torch.randn_like(ref) if ref.dim() else torch.tensor(1.7, dtype=torch.float64)
    grads = [
        torch.autograd.grad(out, inp, g.to(out.dtype))[0]
        for out, inp in ((ours, xs[0]), (theirs, xs[1]), (ref, x64))
    ]
    # the gradient's terms are of size |g| / rows even where they cancel to 0 (e.g. C = 1)
    rows = max(1, x.numel() // max(x.shape[1] if x.dim() > 1 else x.shape[0], 1))
    gmax = g.abs().max().item() if g.numel() else 0.0
    _matches(*grads, k=k, name="grad_input", scale=gmax / rows)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("soft", [False, True], ids=["class", "probs"])
def test_matches_torch(shape, opts, soft):
    if soft and opts.get("ignore"):
        pytest.skip("ignore_index does not apply to probability targets")
    x, t, w, kw = _inputs(shape, opts, soft=soft)
    _check(NF.cross_entropy, F.cross_entropy, x, t, w, kw, k=shape[1])


@pytest.mark.parametrize("shape", [(7, 33), (3, 4099), (2, 5, 3)], ids=str)
@pytest.mark.parametrize("soft", [False, True], ids=["class", "probs"])
def test_every_isa_and_float64(isa, shape, soft):
    for dtype in (torch.float32, torch.float64):
        x, t, w, kw = _inputs(shape, dict(weight=True, label_smoothing=0.1), soft=soft, dtype=dtype)
        _check(NF.cross_entropy, F.cross_entropy, x, t, w, kw, k=shape[1])


@pytest.mark.parametrize("shape", [(9, 4099), (40, 1000)], ids=str)
@pytest.mark.parametrize("soft", [False, True], ids=["class", "probs"])
def test_streamed_gradient(isa, stream_stores, shape, soft):
    """Gradients above the streaming threshold (64 KiB here) go out with non-temporal stores:
    rows that start unaligned (C = 4099, a scalar head first) and aligned."""
    x, t, w, kw = _inputs(shape, dict(weight=True, label_smoothing=0.1), soft=soft)
    _check(NF.cross_entropy, F.cross_entropy, x, t, w, kw, k=shape[1])


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_thread_splits(threads):
    x, t, w, kw = _inputs((37, 2100), dict(ignore=True, label_smoothing=0.1))
    _check(NF.cross_entropy, F.cross_entropy, x, t, w, kw, k=2100)


def test_unbatched_and_module():
    torch.manual_seed(3)
    x = torch.randn(10, requires_grad=True)
    for t in (torch.tensor(4), torch.softmax(torch.randn(10), 0)):
        for red in ("mean", "none", "sum"):
            a = NF.cross_entropy(x, t, reduction=red)
            b = F.cross_entropy(x, t, reduction=red)
            assert a.shape == b.shape
            torch.testing.assert_close(a, b)
    w = torch.rand(6)
    ours = nnkernels.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x, t = torch.randn(9, 6, 4), torch.randint(0, 6, (9, 4))
    torch.testing.assert_close(ours(x, t), theirs(x, t))


def test_strided_logits_and_caller_memory_untouched():
    torch.manual_seed(5)
    base = torch.randn(300, 40)
    for x in (base.t(), base[::2, 3:], base.t()[5:17]):  # class stride != 1, sliced rows
        t = torch.randint(0, x.shape[1], (x.shape[0],))
        before = base.clone()
        xs = [x.detach().clone().requires_grad_() for _ in range(2)]
        xo = x.detach().requires_grad_()  # a view of base: must stay unwritten
        a, b = (
            NF.cross_entropy(xo, t, label_smoothing=0.1),
            F.cross_entropy(xs[1], t, label_smoothing=0.1),
        )
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(torch.autograd.grad(a, xo)[0], torch.autograd.grad(b, xs[1])[0])
        assert torch.equal(base, before)


def test_large_and_infinite_logits():
    torch.manual_seed(6)
    x = torch.randn(8, 300, dtype=torch.float64)
    for big in (x * 1e4, x + 1e4):
        t = torch.randint(0, 300, (8,))
        _check(
            NF.cross_entropy,
            F.cross_entropy,
            big.float(),
            t,
            None,
            dict(label_smoothing=0.1),
            k=300,
        )
    masked = x.clone()
    masked[:, ::2] = float("-inf")  # masked classes
    t = torch.arange(8) * 2 + 1
    _check(
        NF.cross_entropy, F.cross_entropy, masked.float(), t, None, dict(reduction="none"), k=300
    )
    # NaN in a row: that row's loss and gradient are NaN, the others are not
    xn = x.float().clone()
    xn[2, 17] = float("nan")
    xn.requires_grad_()
    loss = NF.cross_entropy(xn, t, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[torch.arange(8) != 2]).all()
    g = torch.autograd.grad(loss.sum(), xn)[0]
    assert torch.isnan(g[2]).any() and torch.isfinite(g[3]).all()
    # a row of +inf: NaN, as torch
    xi = x.float().clone()
    xi[0, 5] = float("inf")
    assert torch.isnan(NF.cross_entropy(xi, t, reduction="none")[0])
    assert torch.isnan(F.cross_entropy(xi, t, reduction="none")[0])


def test_all_targets_ignored():
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.full((4,), -100)
    for red in ("mean", "sum", "none"):
        a, b = NF.cross_entropy(x, t, reduction=red), F.cross_entropy(x, t, reduction=red)
        torch.testing.assert_close(a, b, equal_nan=True)
    g = torch.autograd.grad(NF.cross_entropy(x, t, reduction="sum"), x)[0]
    assert torch.equal(g, torch.zeros_like(g))


def test_backward_twice_and_grad_output_scales():
    x = torch.randn(6, 9, requires_grad=True)
    w = torch.randn(5, 9, requires_grad=True)
    t = torch.randint(0, 5, (6,))
    for ours, theirs in (
        (lambda: NF.cross_entropy(x @ w.t(), t), lambda: F.cross_entropy(x @ w.t(), t)),
        (lambda: NF.linear_cross_entropy(x, w, t), lambda: F.cross_entropy(x @ w.t(), t)),
    ):
        loss, ref = ours(), theirs()
        for scale in (3.0, 1.0, -0.5):  # the second and third backward recompute
            got = torch.autograd.grad(loss * scale, (x, w), retain_graph=True)
            want = torch.autograd.grad(ref * scale, (x, w), retain_graph=True)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)


def test_pooled_gradient_buffer(monkeypatch):
    """Recycled CPU gradient buffers: never handed out while a previous gradient is alive."""
    monkeypatch.setattr(ce_ops, "_POOL_MIN_BYTES", 0)
    x = torch.randn(5, 12, requires_grad=True)
    t = torch.randint(0, 12, (5,))
    NF.cross_entropy(x, t).backward()
    kept = x.grad.clone()
    NF.cross_entropy(x * 2, t).backward()  # x.grad alive: must not be overwritten by the kernel
    x2 = (x.detach() * 2).requires_grad_()
    F.cross_entropy(x2, t).backward()
    torch.testing.assert_close(x.grad, kept + 2 * x2.grad)
    x.grad = None
    NF.cross_entropy(x, t).backward()
    torch.testing.assert_close(x.grad, kept)


@pytest.mark.parametrize("soft", [False, True], ids=["class", "probs"])
def test_gradcheck(soft):
    torch.manual_seed(8)
    for shape, opts in (
        ((4, 7), dict(weight=True, label_smoothing=0.2)),
        ((3, 5, 2), dict(ignore=True)),
    ):
        if soft and opts.get("ignore"):
            continue
        x, t, w, kw = _inputs(shape, opts, soft=soft, dtype=torch.float64)
        for red in ("mean", "none"):
            kw["reduction"] = red
            f = lambda x_, t=t, w=w, kw=dict(kw): NF.cross_entropy(x_, t, weight=w, **kw)  # noqa: E731
            assert torch.autograd.gradcheck(f, (x.requires_grad_(),))


def test_bad_input():
    x = torch.randn(4, 5)
    t = torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match=r"target\[2\] = 5"):
        NF.cross_entropy(x, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="target"):
        NF.cross_entropy(x, torch.tensor([0, -1, 3, 2]))
    with pytest.raises(ValueError, match="target must have shape"):
        NF.cross_entropy(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        NF.cross_entropy(x, t.int())
    with pytest.raises(ValueError, match="probabilities must have"):
        NF.cross_entropy(x, torch.rand(4, 6))
    with pytest.raises(TypeError, match="target has dtype"):
        NF.cross_entropy(x, torch.rand(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight must have shape"):
        NF.cross_entropy(x, t, weight=torch.ones(4))
    with pytest.raises(ValueError, match="reduction"):
        NF.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        NF.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(TypeError, match="input"):
        NF.cross_entropy(t, t)
    assert NF.cross_entropy(x.half(), t).dtype == torch.float16  # float32 math (test_low_precision)
    with pytest.raises(ValueError, match="0-d"):
        NF.cross_entropy(torch.tensor(1.0), t)
    with pytest.raises(ValueError, match="target"):
        NF.linear_cross_entropy(x, torch.randn(7, 5), torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match="weight must have shape"):
        NF.linear_cross_entropy(x, torch.randn(7, 4), t)
    with pytest.raises(ValueError, match="bias must have shape"):
        NF.linear_cross_entropy(x, torch.randn(7, 5), t, bias=torch.randn(6))
    with pytest.raises(ValueError, match="target must have shape"):
        NF.linear_cross_entropy(x, torch.randn(7, 5), t[:3])


# ------------------------------------------------------------------------ linear_cross_entropy


def _lce_reference(x, w, t, b, **kw):
    """cross_entropy(linear(x)) with the leading dims of x (and t) as the batch."""
    logits = F.linear(x, w, b)
    out = F.cross_entropy(logits.reshape(-1, w.shape[0]), t.reshape(-1), **kw)
    return out.reshape(t.shape) if kw.get("reduction") == "none" else out


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(reduction="sum", label_smoothing=0.1),
        dict(reduction="none", ignore=True),
        dict(ignore=True, label_smoothing=0.2),
    ],
    ids=str,
)
@pytest.mark.parametrize("chunk_values", [None, 700], ids=["one-chunk", "many-chunks"])
def test_linear_cross_entropy(bias, opts, chunk_values, monkeypatch):
    if chunk_values:
        monkeypatch.setattr(ce_ops, "_CHUNK_VALUES", chunk_values)  # 700 // 61 = 11 rows a chunk
    torch.manual_seed(9)
    n, h, v = 53, 24, 61
    x64, w64 = torch.randn(n, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64) * 0.3
    b64 = torch.randn(v, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, (n,))
    kw = dict(
        reduction=opts.get("reduction", "mean"), label_smoothing=opts.get("label_smoothing", 0.0)
    )
    if opts.get("ignore"):
        t[::4] = -100

    def run(fn, dtype):
        leaves = [a.to(dtype).requires_grad_() for a in (x64, w64, b64) if a is not None]
        out = fn(leaves[0], leaves[1], t, leaves[2] if bias else None, **kw)
        g = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
        return [out, *torch.autograd.grad(out, leaves, g.to(dtype))]

    ours = run(NF.linear_cross_entropy, torch.float32)
    theirs = run(_lce_reference, torch.float32)
    ref = run(_lce_reference, torch.float64)
    for name, a, b, r in zip(("loss", "dinput", "dweight", "dbias"), ours, theirs, ref):
        assert_matches_reference(a, b, r, k=max(n, v, h), name=name)


def test_linear_cross_entropy_batched_and_gradcheck():
    torch.manual_seed(10)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (2, 3))
    for red in ("mean", "none"):
        a = NF.linear_cross_entropy(x, w, t, b, reduction=red, label_smoothing=0.1)
        r = _lce_reference(x, w, t, b, reduction=red, label_smoothing=0.1)
        assert a.shape == r.shape
        torch.testing.assert_close(a, r)

        def f(x_, w_, b_, red=red):
            return NF.linear_cross_entropy(x_, w_, t, b_, reduction=red)

        assert torch.autograd.gradcheck(f, (x, w, b))
    with torch.no_grad():
        torch.testing.assert_close(NF.linear_cross_entropy(x, w, t), _lce_reference(x, w, t, None))


@pytest.mark.skipif(not nnkernels.cuda_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 7), (17, 129), (5, 1000), (3, 4099), (2, 6, 3, 4)], ids=str)
@pytest.mark.parametrize(
    "opts", [dict(), dict(weight=True, label_smoothing=0.2, ignore=True)], ids=str
)
@pytest.mark.parametrize("soft", [False, True], ids=["class", "probs"])
def test_cuda_matches_torch(dtype, shape, opts, soft):
    if soft and opts.get("ignore"):
        pytest.skip("ignore_index does not apply to probability targets")
    x, t, w, kw = _inputs(shape, opts, soft=soft)
    dev = lambda v: None if v is None else v.cuda()  # noqa: E731
    x, t, w = dev(x).to(dtype), dev(t), dev(w)
    if soft:
        t = t.to(dtype)
    if w is not None:
        w = w.to(dtype)
    _check(NF.cross_entropy, F.cross_entropy, x, t, w, kw, k=shape[1])


@pytest.mark.skipif(not nnkernels.cuda_available(), reason="no CUDA GPU visible")
def test_cuda_linear_cross_entropy_and_bad_target():
    torch.manual_seed(12)
    x = torch.randn(40, 16, device="cuda", requires_grad=True)
    w = torch.randn(300, 16, device="cuda", requires_grad=True)
    t = torch.randint(0, 300, (40,), device="cuda")
    a = NF.linear_cross_entropy(x, w, t, label_smoothing=0.1)
    r = _lce_reference(x, w, t, None, label_smoothing=0.1)
    torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    for ga, gr in zip(torch.autograd.grad(a, (x, w)), torch.autograd.grad(r, (x, w))):
        torch.testing.assert_close(ga, gr, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="target"):
        NF.cross_entropy(torch.randn(3, 4, device="cuda"), torch.tensor([0, 4, 1], device="cuda"))


def test_options_product_small():
    """Every combination of the options on one small K-dim case, both target kinds."""
    for weight, ignore, smooth, red in itertools.product(
        (False, True), (False, True), (0.0, 0.25), ("mean", "sum", "none")
    ):
        opts = dict(weight=weight, ignore=ignore, label_smoothing=smooth, reduction=red)
        x, t, w, kw = _inputs((3, 4, 5), opts)
        _check(NF.cross_entropy, F.cross_entropy, x, t, w, kw, k=4)
