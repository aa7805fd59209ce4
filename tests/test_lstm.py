"""nnkernels.functional.lstm_cell / nn.LSTMCell and nn.LSTM against torch: outputs, final states
and every gradient (input, initial states, each parameter) for single- and multi-layer,
bidirectional and batch_first LSTMs, with and without biases and initial states, vector tails (H
not a multiple of the SIMD width), zero batch, strided inputs and weights, every CPU path, thread
splits, saturated gates, dropout, a retained graph, gradcheck in float64, checkpoints both ways and
bad input."""

import nnkernels
import nnkernels.functional as NF
import nnkernels.nn as nnn
import pytest
import torch
from conftest import assert_matches_reference
from nnkernels import _C
from torch.utils.dlpack import to_dlpack


def _run(module, x, hx, seed=5):
    """Output, (h_n, c_n) and the gradients of a random linear loss w.r.t. x, hx and parameters."""
    leaves = [x.detach().requires_grad_()]
    if hx is not None:
        leaves += [t.detach().requires_grad_() for t in hx]
    out, (h, c) = module(leaves[0], tuple(leaves[1:]) if hx is not None else None)
    g = torch.Generator().manual_seed(seed)
    outs = (out, h, c)
    ws = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, ws))
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, leaves + params)
    return [o.detach() for o in outs], list(grads)


def _twins(cls, *args, dtype=torch.float32, **kw):
    """torch's module, nnkernels' module with the same weights, and torch's float64 copy."""
    torch.manual_seed(3)
    ref = getattr(torch.nn, cls)(*args, **kw).to(dtype)
    ours = getattr(nnn, cls)(*args, **kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    ref64 = getattr(torch.nn, cls)(*args, **kw).double()
    ref64.load_state_dict(ref.state_dict())
    return ref, ours, ref64


def _compare(ours, theirs, ref, names, k):
    for o, t, r, name in zip(ours, theirs, ref, names):
        assert_matches_reference(o, t, r, k=k, name=name)


class _Cell(torch.nn.Module):
    """An LSTMCell with LSTM's calling convention, so one harness serves both."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x, hx):
        h, c = self.cell(x, hx)
        return h, (h * 0.5, c)


# ------------------------------------------------------------------------------------ LSTMCell

CELL_SHAPES = [(1, 1, 1), (3, 7, 17), (5, 129, 9), (4, 16, 32), (2, 3, 33), (0, 5, 7)]


@pytest.mark.parametrize("B,I,H", CELL_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
def test_lstm_cell_matches_torch(B, I, H, bias, with_hx, isa):
    ref, ours, ref64 = _twins("LSTMCell", I, H, bias=bias)
    x = torch.randn(B, I)
    hx = (torch.randn(B, H), torch.randn(B, H)) if with_hx else None
    o, go = _run(_Cell(ours), x, hx)
    t, gt = _run(_Cell(ref), x, hx)
    hx64 = None if hx is None else tuple(v.double() for v in hx)
    r, gr = _run(_Cell(ref64), x.double(), hx64)
    names = ["h'", "h'/2", "c'"]
    _compare(o, t, r, names, k=I + H)
    gnames = ["grad input"] + (["grad h", "grad c"] if with_hx else [])
    gnames += [f"grad {n}" for n, _ in ours.named_parameters()]
    _compare(go, gt, gr, gnames, k=max(B, 1) + 4 * H)


def test_lstm_cell_functional_unbatched_and_no_state():
    ref, ours, _ = _twins("LSTMCell", 6, 10)
    x, h, c = torch.randn(6), torch.randn(10), torch.randn(10)
    for hx in [(h, c), None]:
        a, b = ref(x, hx), ours(x, hx)
        assert b[0].shape == (10,) and b[1].shape == (10,)
        torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-6)
    h1, c1 = NF.lstm_cell(x[None], (h[None], c[None]), ours.weight_ih, ours.weight_hh)
    r = torch.nn.functional.linear(x[None], ours.weight_ih) + h[None] @ ours.weight_hh.T
    i, f, g, o = r.chunk(4, 1)
    c_ref = f.sigmoid() * c + i.sigmoid() * g.tanh()
    torch.testing.assert_close(c1, c_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1, o.sigmoid() * c_ref.tanh(), rtol=1e-5, atol=1e-6)


def test_lstm_cell_gradcheck():
    torch.manual_seed(0)
    B, I, H = 3, 4, 5
    args = [
        torch.randn(B, I),
        torch.randn(B, H),
        torch.randn(B, H),
        torch.randn(4 * H, I),
        torch.randn(4 * H, H),
        torch.randn(4 * H),
        torch.randn(4 * H),
    ]
    args = [a.double().requires_grad_() for a in args]

    def f(x, h, c, w_ih, w_hh, b_ih, b_hh):
        return NF.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)

    assert torch.autograd.gradcheck(f, args)


def test_lstm_cell_backward_paths():
    """The cell's backward with one output unused (its gradient None), a second backward through a
    retained graph (the first overwrote the saved gates), one bias only, frozen weights, a
    non-contiguous input and a state h that needs no gradient (the kernel then skips d h's
    product), each against torch.lstm_cell."""
    torch.manual_seed(0)
    B, I, H = 3, 5, 7
    x = torch.randn(I, B).t()  # strided rows
    h, c = torch.randn(B, H), torch.randn(B, H)
    w_ih, w_hh, b_ih = torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H)
    cases = [(0, (b_ih, None), False, True), (1, (None, b_ih), True, True), (2, (), False, True)]
    cases += [(0, (b_ih, b_ih), False, False), (2, (), True, False)]
    for use, biases, frozen, h_grad in cases:
        grads = []
        for f in (NF.lstm_cell, torch.lstm_cell):
            leaves = [t.clone().requires_grad_(r) for t, r in ((x, True), (h, h_grad), (c, True))]
            ws = [t.clone().requires_grad_(not frozen) for t in (w_ih, w_hh)]
            bs = [None if b is None else b.clone().requires_grad_() for b in biases]
            out = f(leaves[0], (leaves[1], leaves[2]), *ws, *bs)
            loss = out[0].sum() if use == 0 else out[1].sum() if use == 1 else sum(out).sum()
            inputs = [t for t in leaves + ws + bs if t is not None and t.requires_grad]
            g1 = torch.autograd.grad(loss, inputs, retain_graph=True)
            g2 = torch.autograd.grad(loss, inputs)
            grads.append((g1, g2))
        for a, b in zip(grads[0][0] + grads[0][1], grads[1][0] + grads[1][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- LSTM

CONFIGS = [
    dict(),
    dict(num_layers=2),
    dict(bidirectional=True),
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(num_layers=3, bias=False),
    dict(batch_first=True, bias=False, bidirectional=True),
]


def _lstm_case(cfg, T, B, I, H, with_hx, dtype=torch.float32):
    ref, ours, ref64 = _twins("LSTM", I, H, dtype=dtype, **cfg)
    D = 2 if cfg.get("bidirectional") else 1
    L = cfg.get("num_layers", 1)
    x = torch.randn(B, T, I) if cfg.get("batch_first") else torch.randn(T, B, I)
    hx = (torch.randn(L * D, B, H), torch.randn(L * D, B, H)) if with_hx else None
    cast = lambda v, dt: None if v is None else tuple(t.to(dt) for t in v)  # noqa: E731
    o, go = _run(ours, x.to(dtype), cast(hx, dtype))
    t, gt = _run(ref, x.to(dtype), cast(hx, dtype))
    r, gr = _run(ref64, x.double(), cast(hx, torch.float64))
    gnames = ["grad input"] + (["grad h0", "grad c0"] if with_hx else [])
    gnames += [f"grad {n}" for n, _ in ours.named_parameters()]
    k = T * max(B, 1) + I + 4 * H
    _compare(o, t, r, ["output", "h_n", "c_n"], k)
    _compare(go, gt, gr, gnames, k)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("T,B,I,H", [(7, 3, 5, 17), (1, 2, 3, 4), (4, 1, 16, 8)])
def test_lstm_matches_torch(cfg, with_hx, T, B, I, H):
    _lstm_case(cfg, T, B, I, H, with_hx)


@pytest.mark.parametrize("cfg", [dict(), dict(num_layers=2, bidirectional=True)])
def test_lstm_every_isa(cfg, isa):
    _lstm_case(cfg, 6, 5, 9, 33, True)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_lstm_thread_splits(threads):
    # H = 64 rows of 4H gates: the step kernels split the batch rows across threads.
    _lstm_case(dict(bidirectional=True), 5, 300, 20, 64, True)


# At least 8 batch rows per thread: each thread runs its own block of rows through the whole
# sequence (uneven blocks: 17 as 9 + 8, 25 as 9 + 8 + 8), forward and backward, both directions,
# given and batch-first strides; 15 rows on 2 threads stay one block.
@pytest.mark.parametrize("threads", [2, 3], indirect=True)
@pytest.mark.parametrize("B", [15, 17, 25])
@pytest.mark.parametrize(
    "cfg", [dict(num_layers=2, bidirectional=True), dict(bidirectional=True, batch_first=True)]
)
def test_lstm_row_blocks(threads, B, cfg):
    _lstm_case(cfg, 6, B, 9, 33, True)


@pytest.mark.parametrize("threads", [2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lstm_row_blocks_every_isa(isa, threads, dtype):
    _lstm_case(dict(bidirectional=True), 4, 19, 5, 17, True, dtype=dtype)


def test_lstm_float64_matches_torch():
    _lstm_case(dict(num_layers=2, bidirectional=True), 5, 3, 4, 6, True, dtype=torch.float64)


def test_lstm_zero_batch_and_bad_length():
    ref, ours, _ = _twins("LSTM", 3, 4, num_layers=2)
    x = torch.randn(5, 0, 3, requires_grad=True)
    y, (h, c) = ours(x)
    assert y.shape == (5, 0, 4) and h.shape == (2, 0, 4) and c.shape == (2, 0, 4)
    (y.sum() + h.sum()).backward()
    assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())
    with pytest.raises(ValueError, match="sequence length 0"):
        ours(torch.randn(0, 2, 3))


def test_lstm_unbatched():
    ref, ours, _ = _twins("LSTM", 3, 4, num_layers=2, bidirectional=True)
    x, h0, c0 = torch.randn(6, 3), torch.randn(4, 4), torch.randn(4, 4)
    for hx in [(h0, c0), None]:
        (a, (ha, ca)), (b, (hb, cb)) = ref(x, hx), ours(x, hx)
        assert b.shape == a.shape and hb.shape == ha.shape
        for p, q in [(a, b), (ha, hb), (ca, cb)]:
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_lstm_strided_inputs_and_weights():
    ref, ours, _ = _twins("LSTM", 5, 9, bidirectional=True)
    with torch.no_grad():  # weights as transposed views: the GEMMs read them in place
        for name, p in list(ours.named_parameters()):
            if p.dim() == 2:
                setattr(ours, name, torch.nn.Parameter(p.detach().T.contiguous().T))
    assert not ours.weight_ih_l0.is_contiguous()
    x = torch.randn(8, 4, 10)[:, :, ::2]  # no unit stride along the features
    h0 = torch.randn(2, 9, 4).transpose(1, 2)  # (2, 4, 9), strided
    c0 = torch.randn(2, 4, 18)[:, :, ::2]
    o, go = _run(ours, x, (h0, c0))
    t, gt = _run(ref, x, (h0, c0))
    for a, b in zip(o + go, t + gt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_lstm_saturated_gates():
    ref, ours, ref64 = _twins("LSTM", 4, 8)
    x = torch.randn(6, 3, 4) * 60  # pre-activations far into the flat parts of sigmoid and tanh
    o, go = _run(ours, x, None)
    t, gt = _run(ref, x, None)
    r, gr = _run(ref64, x.double(), None)
    assert all(torch.isfinite(v).all() for v in o + go)
    _compare(o, t, r, ["output", "h_n", "c_n"], 40)
    _compare(go, gt, gr, ["grad input"] + [n for n, _ in ours.named_parameters()], 40)


def test_lstm_nan_propagates():
    ref, ours, _ = _twins("LSTM", 4, 8)
    x = torch.randn(5, 3, 4)
    x[2, 1, 0] = float("nan")
    y, (h, c) = ours(x)
    y_ref, _ = ref(x)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))


def test_lstm_retained_graph_backward_twice():
    _, ours, _ = _twins("LSTM", 4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 4, requires_grad=True)
    y, (h, c) = ours(x)
    loss = y.square().sum() + c.sum()
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)  # the gates were overwritten: recomputed
    torch.testing.assert_close(g1, g2)


def test_lstm_only_final_state_used():
    ref, ours, _ = _twins("LSTM", 4, 6, bidirectional=True)
    x = torch.randn(5, 3, 4, requires_grad=True)
    grads = []
    for m in (ref, ours):
        _, (h, _) = m(x)
        grads.append(torch.autograd.grad(h.sum(), [x, *m.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_lstm_dropout_between_layers():
    """In training, dropout(p) hits the outputs of every layer but the last, exactly as a chain of
    single-layer LSTMs with F.dropout between them; in eval it is off (torch's result)."""
    ref, ours, _ = _twins("LSTM", 4, 6, num_layers=3, dropout=0.5)
    x = torch.randn(5, 3, 4)
    layers = []
    for k in range(3):
        m = nnn.LSTM(4 if k == 0 else 6, 6)
        m.weight_ih_l0, m.weight_hh_l0 = (
            ours.get_parameter(f"weight_ih_l{k}"),
            ours.get_parameter(f"weight_hh_l{k}"),
        )
        m.bias_ih_l0, m.bias_hh_l0 = (
            ours.get_parameter(f"bias_ih_l{k}"),
            ours.get_parameter(f"bias_hh_l{k}"),
        )
        layers.append(m)
    torch.manual_seed(7)
    y, _ = ours(x)
    torch.manual_seed(7)
    z = x
    for k, m in enumerate(layers):
        z, _ = m(z)
        if k < 2:
            z = torch.nn.functional.dropout(z, 0.5, training=True)
    torch.testing.assert_close(y, z)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)


def test_lstm_gradcheck():
    torch.manual_seed(0)
    m = nnn.LSTM(3, 4, num_layers=2, bidirectional=True).double()
    params = [p.detach().requires_grad_() for p in m.parameters()]
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0, *p):
        y, (h, c) = NF.lstm(x, (h0, c0), list(p), True, 2, 0.0, True, True, False)
        return y, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))


def test_lstm_checkpoints_move_both_ways():
    for kw in [dict(num_layers=2, bidirectional=True), dict(bias=False)]:
        t, o = torch.nn.LSTM(3, 5, **kw), nnn.LSTM(3, 5, **kw)
        assert list(t.state_dict()) == list(o.state_dict())
        o.load_state_dict(t.state_dict())
        t2 = torch.nn.LSTM(3, 5, **kw)
        t2.load_state_dict(o.state_dict())
        x = torch.randn(4, 2, 3)
        torch.testing.assert_close(o(x)[0], t2(x)[0], rtol=1e-5, atol=1e-6)
    c, oc = torch.nn.LSTMCell(3, 5), nnn.LSTMCell(3, 5)
    assert list(c.state_dict()) == list(oc.state_dict())
    assert isinstance(nnn.LSTM(2, 3), torch.nn.LSTM) and isinstance(
        nnn.LSTMCell(2, 3), torch.nn.LSTMCell
    )


def test_lstm_no_grad_path():
    ref, ours, _ = _twins("LSTM", 5, 7, num_layers=2)
    x = torch.randn(6, 3, 5)
    with torch.no_grad():
        y, (h, c) = ours(x)
    assert not y.requires_grad
    torch.testing.assert_close(y, ref(x)[0].detach(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- bad input


def test_lstm_bad_input():
    m = nnn.LSTM(4, 6, num_layers=2)
    with pytest.raises(ValueError, match="input has 5 features"):
        m(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="input must be"):
        m(torch.randn(3, 2, 4, 1))
    with pytest.raises(ValueError, match=r"h0 \(hx\[0\]\) must have shape \(2, 2, 6\)"):
        m(torch.randn(3, 2, 4), (torch.randn(1, 2, 6), torch.randn(2, 2, 6)))
    with pytest.raises(ValueError, match=r"c0 \(hx\[1\]\) must have shape"):
        m(torch.randn(3, 2, 4), (torch.randn(2, 2, 6), torch.randn(2, 3, 6)))
    with pytest.raises(TypeError, match="hx must be a tuple"):
        m(torch.randn(3, 2, 4), torch.randn(2, 2, 6))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(3, 2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(3, 2, 4, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match="proj_size"):
        nnn.LSTM(4, 6, proj_size=3)
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 4), [3, 2])
    with pytest.raises(NotImplementedError, match="PackedSequence"):
        m(packed)


def test_lstm_cell_bad_input():
    cell = nnn.LSTMCell(4, 6)
    with pytest.raises(ValueError, match=r"w_ih must have shape \(24, 5\)"):
        cell(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"h must have shape \(2, 6\)"):
        cell(torch.randn(2, 4), (torch.randn(3, 6), torch.randn(2, 6)))
    with pytest.raises(ValueError, match=r"c must have shape \(2, 6\)"):
        cell(torch.randn(2, 4), (torch.randn(2, 6), torch.randn(2, 7)))
    with pytest.raises(ValueError, match="input must be"):
        cell(torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="w_hh must be 2-D"):
        NF.lstm_cell(torch.randn(2, 4), None, torch.randn(24, 4), torch.randn(24))
    with pytest.raises(ValueError, match=r"b_hh must have shape \(24,\)"):
        NF.lstm_cell(
            torch.randn(2, 4), None, torch.randn(24, 4), torch.randn(24, 6), None, torch.randn(23)
        )
    with pytest.raises(ValueError, match="is on"):
        NF.lstm_cell(
            torch.randn(2, 4),
            (torch.randn(2, 6, device="meta"), torch.randn(2, 6)),
            torch.randn(24, 4),
            torch.randn(24, 6),
        )


def test_lstm_kernel_checks_its_buffers():
    """The binding validates every view itself (shapes, layouts, overlaps) before any kernel."""
    T, B, I, H = 3, 2, 4, 5
    x, w_ih, w_hh = torch.randn(T, B, I), torch.randn(4 * H, I), torch.randn(4 * H, H)
    h0, c0 = torch.zeros(B, H), torch.zeros(B, H)
    y, g, c = torch.empty(T, B, H), torch.empty(T, B, 4 * H), torch.empty(T, B, H)
    d = to_dlpack

    def fwd(**kw):
        a = dict(x=x, w_ih=w_ih, w_hh=w_hh, h0=h0, c0=c0, y=y, g=g, c=c) | kw
        _C.lstm_forward(
            d(a["x"]),
            d(a["w_ih"]),
            d(a["w_hh"]),
            None,
            d(a["h0"]),
            d(a["c0"]),
            d(a["y"]),
            d(a["g"]),
            d(a["c"]),
            False,
        )

    fwd()
    with pytest.raises(ValueError, match="gates must have shape"):
        fwd(g=torch.empty(T, B, 4 * H + 1))
    with pytest.raises(ValueError, match="gates must be contiguous"):
        fwd(g=torch.empty(T, 4 * H, B).transpose(1, 2))
    with pytest.raises(ValueError, match="input must have unit stride"):
        fwd(x=torch.randn(B, T, I).transpose(0, 1))
    with pytest.raises(ValueError, match="w_ih must have shape"):
        fwd(w_ih=torch.randn(4 * H, I + 1))
    with pytest.raises(ValueError, match="share memory"):
        fwd(c=y)  # cell_states and output the same memory
    with pytest.raises(ValueError, match="h0 must have shape"):
        fwd(h0=torch.zeros(B + 1, H))
    with pytest.raises(TypeError):
        fwd(c0=torch.zeros(B, H, dtype=torch.float64))
    # One step: every sequence argument 2-D, else a clear error.
    one = dict(x=x[0], y=y[0], g=g[0], c=c[0])
    fwd(**one)
    torch.testing.assert_close(y[0], NF.lstm_cell(x[0], (h0, c0), w_ih, w_hh)[0])
    with pytest.raises(ValueError, match=r"output must be \(B, n\) like input \(one step\)"):
        fwd(**(one | dict(y=y)))
    with pytest.raises(ValueError, match=r"gates must be \(T, B, n\) like input"):
        fwd(g=g[0])
    with pytest.raises(ValueError, match="cell_states must have shape"):
        fwd(**(one | dict(c=torch.empty(B, H + 1))))


@pytest.mark.skipif(not nnkernels.cuda_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("cfg", [dict(), dict(num_layers=2, bidirectional=True, batch_first=True)])
def test_lstm_cuda_matches_cudnn(cfg):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ref, ours, ref64 = (m.cuda() for m in _twins("LSTM", 33, 65, **cfg))
    x = torch.randn(9, 7, 33, device="cuda")
    o, go = _run(ours, x, None)
    t, gt = _run(ref, x, None)
    r, gr = _run(ref64, x.double(), None)
    _compare(o, t, r, ["output", "h_n", "c_n"], 200)
    _compare(go, gt, gr, ["grad input"] + [n for n, _ in ours.named_parameters()], 200)
