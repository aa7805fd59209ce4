"""float16 / bfloat16 on the CPU beyond the GEMM's own tests (test_bf16_gemm, test_bf16_conv2d):
batch norm and cross-entropy compute low-precision activations in float32 and return torch's
dtypes; under torch.autocast every swapped layer computes on nnkernels' kernels (bfloat16 GEMMs for
Linear and Conv2d, float32 for the LSTMs, batch norm and the loss) and returns the dtypes torch's
autocast returns, and a swapped model trains under autocast like torch's.

Parity is the project's rule (assert_matches_reference): ours within 8x torch's own error of the
float64 reference, in the low-precision dtype."""

import copy

import nnkernels
import nnkernels.functional as NF
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference
from nnkernels.bench.models import course_cnn

LOW = [torch.bfloat16, torch.float16]


def _grads(fn, leaves):
    """fn's output and the gradients of a fixed random linear loss w.r.t. the leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return out.detach(), torch.autograd.grad(out, leaves, g)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("params", ["float32", "same", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_low_precision_input(dtype, training, params, layout):
    """torch's mixed-dtype batch norm (low-precision input, float32 weight, bias and running
    statistics) and the all-low-precision one: output in input's dtype, running statistics updated
    in their own dtype, gradients of input and weight in their dtypes."""
    torch.manual_seed(0)
    N, C, H, W = 3, 5, 7, 6
    x = (torch.randn(N, C, H, W) * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    pdt = torch.float32 if params == "float32" else dtype
    w = torch.rand(C).to(pdt) + 0.5 if params != "none" else None
    b = torch.randn(C).to(pdt) if params != "none" else None
    rm, rv = torch.randn(C).to(pdt), (torch.rand(C) + 0.5).to(pdt)
    if params == "none":
        rm, rv = rm.float(), rv.float()
    stats = {name: (rm.clone(), rv.clone()) for name in ("ours", "torch", "ref")}

    def run(f, name, cast=None):
        m, v = stats[name]
        if cast:
            m, v = m.double(), v.double()
            stats[name] = (m, v)

        def fn(x, *p):
            wb = list(p) + [None] * (2 - len(p))
            return f(x, m, v, wb[0], wb[1], training, 0.1, 1e-5)

        leaves = [x.double() if cast else x] + [
            (t.double() if cast else t) for t in (w, b) if t is not None
        ]
        return _grads(fn, leaves)

    ours, g_ours = run(NF.batch_norm, "ours")
    theirs, g_theirs = run(F.batch_norm, "torch")
    ref, g_ref = run(F.batch_norm, "ref", cast=True)
    assert ours.dtype == theirs.dtype == dtype
    assert ours.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert_matches_reference(ours, theirs, ref, k=N * H * W, name="output")
    names = ["grad input", "grad weight", "grad bias"]
    for a, t, r, name in zip(g_ours, g_theirs, g_ref, names):
        assert_matches_reference(a, t, r, k=N * H * W, name=name)
    for i, name in enumerate(("running_mean", "running_var")):
        a, t, r = stats["ours"][i], stats["torch"][i], stats["ref"][i]
        assert a.dtype == t.dtype == (pdt if params != "none" else torch.float32), name
        assert_matches_reference(a, t, r, k=N * H * W, name=name)


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((6, 7), "contiguous"),  # (N, C): the batch is the spatial dim
        ((3, 5, 11), "contiguous"),
        ((2, 5, 256, 256), "contiguous"),  # channel blocks of 2 (the float32 scratch bound)
        ((2, 5, 256, 256), "channels_last"),
        ((4, 3, 1, 1), "contiguous"),
        ((0, 3, 4, 4), "contiguous"),  # eval only: an empty batch has no statistics
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_bf16_mixed_kernels(shape, layout, training, monkeypatch):
    """A bfloat16 input with float32 weight, bias and running statistics runs the mixed-dtype
    kernels (blocks of channels widened in float32 scratch), not float32 copies from Python:
    output, running statistics and every gradient within the rule against torch's."""
    if training and shape[0] == 0:
        pytest.skip("training needs more than one value per channel")
    import nnkernels.functional as functional

    def refuse(*args, **kwargs):
        raise AssertionError("widened on float32 copies")

    monkeypatch.setattr(functional, "_batch_norm_widened", refuse)
    C = shape[1]
    x = (torch.randn(shape) * 3 + 1).bfloat16()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    stats = {k: (rm.clone(), rv.clone()) for k in ("ours", "torch")}
    ref_stats = tuple(t.double() for t in stats["torch"])
    k = x.numel() // max(C, 1)
    results = []
    for fn, name, cast in (
        (NF.batch_norm, "ours", None),
        (F.batch_norm, "torch", None),
        (F.batch_norm, "ref", torch.float64),
    ):
        m, v = ref_stats if cast else stats[name]
        leaves = [t.to(cast) if cast else t for t in (x, w, b)]
        results.append(
            _grads(lambda x, w, b, f=fn, m=m, v=v: f(x, m, v, w, b, training, 0.1, 1e-5), leaves)
        )
    (o, go), (t, gt), (r, gr) = results
    assert (
        o.dtype == torch.bfloat16
        and [g.dtype for g in go] == [torch.bfloat16] + [torch.float32] * 2
    )
    assert_matches_reference(o, t, r, k=k, name="output")
    for a, t_, r_, name in zip(go, gt, gr, ("input", "weight", "bias")):
        assert_matches_reference(a, t_, r_, k=k, name=f"grad {name}")
    for a, t_, r_, name in zip(stats["ours"], stats["torch"], ref_stats, ("mean", "var")):
        assert_matches_reference(a, t_, r_, k=k, name=f"running {name}")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_kind", ["index", "same", "float32"])
def test_cross_entropy_low_precision_logits(dtype, reduction, target_kind):
    """Low-precision logits outside autocast: the loss in torch's dtype (the logits', or their
    promotion with a probability target's), values and the logits' gradient within the rule."""
    torch.manual_seed(0)
    N, Cn = 13, 37  # odd sizes: vector tails
    x = (torch.randn(N, Cn) * 3).to(dtype)
    if target_kind == "index":
        t = torch.randint(0, Cn, (N,))
        t[3] = -100
    else:
        t = torch.randn(N, Cn).softmax(-1).to(dtype if target_kind == "same" else torch.float32)

    def loss(f, cast=False):
        tt = t.double() if cast and t.dtype.is_floating_point else t
        return _grads(
            lambda x: f(x, tt, reduction=reduction, label_smoothing=0.1),
            [x.double() if cast else x],
        )

    ours, (g_ours,) = loss(NF.cross_entropy)
    theirs, (g_theirs,) = loss(F.cross_entropy)
    ref, (g_ref,) = loss(F.cross_entropy, cast=True)
    assert ours.dtype == theirs.dtype
    assert_matches_reference(ours, theirs, ref, k=Cn, name="loss")
    assert_matches_reference(g_ours, g_theirs, g_ref, k=Cn, name="grad input")


def test_cross_entropy_low_precision_weight_must_match():
    """torch refuses a class weight of another dtype than the logits; so do we, naming it."""
    x, t = torch.randn(4, 5).bfloat16(), torch.randint(0, 5, (4,))
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, t, weight=torch.rand(5))
    with pytest.raises(TypeError, match="weight"):
        NF.cross_entropy(x, t, weight=torch.rand(5))
    assert NF.cross_entropy(x, t, weight=torch.rand(5).bfloat16()).dtype == torch.bfloat16
    p = torch.rand(4, 5, dtype=torch.float64).softmax(-1)  # promotes to float64, as in torch
    ours, theirs = NF.cross_entropy(x, p), F.cross_entropy(x, p)
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2)  # torch rounds to bfloat16


def test_batch_norm_low_precision_mixed_params_refused():
    """torch takes a bfloat16 input with all-float32 or all-bfloat16 weight, bias and statistics,
    and refuses a mix; so do we, naming what it got."""
    x, w32 = torch.randn(2, 3, 4).bfloat16(), torch.ones(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError):
        F.batch_norm(x, rm, rv, w32.bfloat16(), None, True)
    with pytest.raises(TypeError, match="weight torch.bfloat16"):
        NF.batch_norm(x, rm, rv, w32.bfloat16(), None, True)


def _swapped(module):
    twin = copy.deepcopy(module)
    nnkernels.swap_layers(twin)
    return twin


def test_autocast_dtypes_layer_by_layer():
    """Under torch.autocast("cpu", bfloat16) each swapped layer returns the dtype torch's autocast
    returns for it, with values within the rule: Linear, Conv2d, LSTM and LSTMCell in bfloat16;
    BatchNorm on a bfloat16 input in bfloat16 (float32 statistics), on a float32 input in float32;
    CrossEntropyLoss in float32 (autocast's float32 list) from bfloat16 or float32 logits."""
    torch.manual_seed(0)
    img, seq, flat = torch.randn(2, 3, 6, 6), torch.randn(4, 2, 5), torch.randn(6, 7)
    target = torch.randint(0, 7, (6,))
    cases = [
        (torch.nn.Linear(7, 4), lambda m: m(flat)),
        (torch.nn.Conv2d(3, 4, 3), lambda m: m(img)),
        (torch.nn.BatchNorm2d(3), lambda m: m(img.bfloat16())),
        (torch.nn.BatchNorm2d(3), lambda m: m(img)),
        (torch.nn.BatchNorm1d(7), lambda m: m(flat.bfloat16())),
        (torch.nn.CrossEntropyLoss(), lambda m: m(flat.bfloat16(), target)),
        (torch.nn.CrossEntropyLoss(label_smoothing=0.2), lambda m: m(flat, target)),
        (torch.nn.LSTM(5, 3), lambda m: m(seq)[0]),
        (torch.nn.LSTMCell(5, 3), lambda m: m(seq[0])[0]),
    ]
    for module, call in cases:
        ours_m = _swapped(module)
        assert type(ours_m) is not type(module), type(module).__name__
        with torch.autocast("cpu", dtype=torch.bfloat16):
            try:
                theirs = call(module)
            except RuntimeError:  # torch's own LSTM has no bfloat16 kernel on some CPUs
                continue
            ours = call(ours_m)
        name = type(module).__name__
        assert ours.dtype == theirs.dtype, f"{name}: {ours.dtype} != torch's {theirs.dtype}"
        # (torch's float32 LSTMCell result carries its bfloat16 gate GEMMs' rounding; ours not)
        tol = 2e-2 if ours.dtype == torch.bfloat16 or name == "LSTMCell" else 1e-5
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol, msg=name)
        # every parameter's gradient in torch's dtype (float32: the casts' backward)
        for (pn, p), q in zip(ours_m.named_parameters(), module.parameters()):
            gp, gq = (
                torch.autograd.grad(ours.float().sum(), p),
                torch.autograd.grad(theirs.float().sum(), q),
            )
            assert gp[0].dtype == gq[0].dtype, f"{name}.{pn}: grad {gp[0].dtype} != {gq[0].dtype}"
            break


@pytest.mark.parametrize(
    "xd,cd",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, None),
        (torch.bfloat16, None),
    ],
)
def test_autocast_lstm_cell_dtypes(xd, cd):
    """torch's LSTMCell under CPU autocast returns the promotion of the autocast dtype with the
    cell state's (the input's when hx is None); ours the same, computed in float32."""
    cell = torch.nn.LSTMCell(8, 16)
    ours = _swapped(cell)
    x = torch.randn(3, 8, dtype=xd)
    hx = None if cd is None else (torch.randn(3, 16, dtype=cd), torch.randn(3, 16, dtype=cd))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = cell(x, hx), ours(x, hx)
    for t, o in zip(a, b):
        assert o.dtype == t.dtype
        torch.testing.assert_close(o.float(), t.float(), rtol=2e-2, atol=2e-2)


def test_autocast_lstms_run_our_kernels(monkeypatch):
    """Under CPU autocast the swapped LSTM and LSTMCell compute with nnkernels (torch's LSTM ops
    are made to fail), in float32 (closer to the float64 result than torch's bfloat16), and return
    torch's dtypes; the float32 weights get float32 gradients."""
    torch.manual_seed(0)
    lstm, cell = torch.nn.LSTM(6, 8, num_layers=2), torch.nn.LSTMCell(6, 8)
    ours_lstm, ours_cell = _swapped(lstm), _swapped(cell)
    x = torch.randn(5, 3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = lstm(x)[0], cell(x[0])[0]

    def refuse(*args, **kwargs):
        raise AssertionError("handed back to torch")

    for name in ("lstm", "lstm_cell"):
        monkeypatch.setattr(torch, name, refuse)
        monkeypatch.setattr(torch._VF, name, refuse)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ours_lstm(x)[0], ours_cell(x[0])[0]
    grads = [
        torch.autograd.grad(o.float().sum(), m.weight_ih_l0 if m is ours_lstm else m.weight_ih)
        for o, m in zip(ours, (ours_lstm, ours_cell))
    ]
    monkeypatch.undo()
    ref = copy.deepcopy(lstm).double()(x.double())[0]
    for o, t in zip(ours, theirs):
        assert o.dtype == t.dtype
        torch.testing.assert_close(o.float(), t.float(), rtol=2e-2, atol=2e-2)
    assert (ours[0].double() - ref).abs().max() <= (theirs[0].double() - ref).abs().max() * 8
    assert all(g[0].dtype == torch.float32 for g in grads)


class _RowReader(torch.nn.Module):
    """The course's LSTM classifier (examples/lstm.py): 8x8 images read row by row."""

    def __init__(self, hidden=32):
        super().__init__()
        self.lstm = torch.nn.LSTM(8, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, 10)

    def forward(self, x):
        out, _ = self.lstm(x.squeeze(1))
        return self.head(out[:, -1])


@pytest.mark.parametrize("build", [course_cnn, _RowReader], ids=["cnn", "lstm"])
def test_autocast_training_loop_matches_torch(build):
    """torch's autocast recipe (forward and loss under autocast, Adam, 20 steps) on the course's
    CNN (conv -> batch norm -> ReLU -> dense) and LSTM classifier, swapped and not, side by side:
    the same losses within bfloat16 rounding, the same running statistics."""
    torch.manual_seed(0)
    theirs = build()
    ours = _swapped(theirs)
    x, target = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            theirs(x)
        except RuntimeError:  # torch's own LSTM has no bfloat16 kernel on some CPUs
            pytest.skip("torch's LSTM does not run under bfloat16 autocast here")
    losses = {}
    loss_fns = {"ours": nnkernels.nn.CrossEntropyLoss(), "torch": torch.nn.CrossEntropyLoss()}
    for name, model in (("ours", ours), ("torch", theirs)):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3 if build is course_cnn else 1e-2)
        losses[name] = []
        for _ in range(20):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fns[name](model(x), target)
            assert loss.dtype == torch.float32
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    a, b = torch.tensor(losses["ours"]), torch.tensor(losses["torch"])
    assert a[-1] < a[0] * 0.9  # it trains
    torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)
    for (n, p), q in zip(ours.named_buffers(), theirs.buffers()):
        if p.dtype.is_floating_point:
            torch.testing.assert_close(p, q, rtol=3e-2, atol=3e-2, msg=n)


def _layer_cases():
    """(name, torch layer, input) for every layer swap_layers swaps, small odd shapes."""
    torch.manual_seed(0)
    return [
        ("Linear", torch.nn.Linear(7, 5), torch.randn(3, 7)),
        ("Conv2d", torch.nn.Conv2d(3, 4, 3, padding=1, stride=2), torch.randn(2, 3, 7, 7)),
        ("BatchNorm2d", torch.nn.BatchNorm2d(3), torch.randn(2, 3, 5, 5)),
        ("LSTM", torch.nn.LSTM(5, 3, num_layers=2, bidirectional=True), torch.randn(4, 2, 5)),
        ("LSTMCell", torch.nn.LSTMCell(5, 3), torch.randn(2, 5)),
    ]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", range(5), ids=lambda i: _layer_cases()[i][0])
@pytest.mark.parametrize("order", ["swap-then-cast", "cast-then-swap"])
def test_low_precision_model_after_swap(dtype, case, order):
    """A float16 / bfloat16 model, swapped before or after model.half() / .bfloat16(), runs every
    layer (on the bfloat16 GEMM, or on float32 copies): torch's dtype, the output and every
    gradient within the rule against a float64 copy of the same layer."""
    name, layer, x = _layer_cases()[case]
    if order == "swap-then-cast":
        ours = _swapped(layer).to(dtype)
    else:
        ours = copy.deepcopy(layer).to(dtype)
        nnkernels.swap_layers(ours)
        assert type(ours) is not type(layer), f"{name} in {dtype} was not swapped"
    theirs = copy.deepcopy(layer).to(dtype)
    ref = copy.deepcopy(layer).double()
    ref.load_state_dict({k: v.to(dtype).double() for k, v in theirs.state_dict().items()})
    try:
        theirs(x.to(dtype))
    except RuntimeError:  # torch has no kernel for this dtype on this CPU: nothing to match
        pytest.skip(f"torch's {name} does not run in {dtype} here")
    results = []
    for m, dt in ((ours, dtype), (theirs, dtype), (ref, torch.float64)):
        xx = x.to(dtype).to(dt).requires_grad_()
        out = _first(m(xx))
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(dt)
        grads = torch.autograd.grad(out, [xx, *m.parameters()], g)
        results.append((out.detach(), grads))
    (o, go), (t, gt), (r, gr) = results
    assert o.dtype == t.dtype == dtype
    k = 64
    assert_matches_reference(o, t, r, k=k, name=f"{name} output")
    for a, b, c in zip(go, gt, gr):
        assert a.dtype == b.dtype
        assert_matches_reference(a, b, c, k=k, name=f"{name} gradient")


def test_low_precision_mixed_dtypes_name_the_argument():
    """torch refuses a float16 input with a float32 weight in these ops; so do we, naming it."""
    x = torch.randn(3, 4).half()
    with pytest.raises(RuntimeError):
        F.linear(x, torch.randn(2, 4))
    with pytest.raises(TypeError, match="weight"):
        NF.linear(x, torch.randn(2, 4))
    with pytest.raises(TypeError, match="b has dtype"):
        NF.matmul(x, torch.randn(4, 2))
    w = torch.randn(2, 3, 3, 3)
    with pytest.raises(TypeError, match="bias"):
        NF.conv2d(torch.randn(1, 3, 5, 5).bfloat16(), w.bfloat16(), torch.randn(2))
