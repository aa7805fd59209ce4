"""torch.compile: nnkernels' ops are torch.library custom ops while torch.compile traces, so a
swapped model compiles with fullgraph=True (no graph breaks) and gives the eager results;
torch.library.opcheck passes for every op."""

import copy

import nnkernels
import nnkernels.functional as NF
import pytest
import torch
from nnkernels.ops import batch_norm as bn
from nnkernels.ops import conv2d as conv
from nnkernels.ops import cross_entropy as ce
from nnkernels.ops import lstm
from nnkernels.ops import matmul as mm

# torch 2.13 warns about its own torch.jit use when dynamo is imported
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _opcheck_cases():
    """Every primitive's custom op on representative arguments. The primitives carry no autograd
    formula (their op's Function does), so no input requires grad."""
    torch.manual_seed(0)
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    x4, w4 = _t(2, 3, 6, 6), _t(4, 3, 3, 3)
    lstm_w = [_t(16, 3), _t(16, 4), _t(16), _t(16)]
    lstm_w2 = lstm_w + [_t(16, 3), _t(16, 4), _t(16), _t(16)]
    x_seq, h0, c0 = _t(3, 2, 3), _t(1, 2, 4), _t(1, 2, 4)
    y, hn, cn, *saved = lstm.layer_kernel(x_seq, h0, c0, lstm_w, 1, True)
    x_step, h, c = _t(2, 3), _t(2, 4), _t(2, 4)
    h1, c1, gates = lstm.cell_kernel(x_step, h, c, lstm_w[0], lstm_w[1], lstm_w[2])
    bn_x = _t(4, 3, 5, 5)
    _, mean, invstd = bn.forward_train(bn_x, None, None, None, None, 0.1, 1e-5)
    return {
        "mm": (mm.mm_kernel, (_t(5, 7), _t(7, 3))),
        "mm batched": (mm.mm_kernel, (_t(2, 5, 7), _t(2, 7, 3))),
        "sum_rows": (mm.sum_rows_kernel, (_t(6, 5),)),
        "linear": (mm.linear_kernel, (_t(5, 7), _t(3, 7), _t(3))),
        "linear no bias": (mm.linear_kernel, (_t(5, 7), _t(3, 7), None)),
        "linear 3-D input": (mm.linear_kernel, (_t(2, 5, 7), _t(3, 7), _t(3))),
        "conv2d": (conv.forward_kernel, (x4, w4, _t(4), *geometry, False)),
        "conv2d channels_last": (
            conv.forward_kernel,
            (x4.contiguous(memory_format=torch.channels_last), w4, None, *geometry, True),
        ),
        "conv2d_backward_data": (
            conv.backward_data_kernel,
            (_t(2, 4, 6, 6), w4, [2, 3, 6, 6], *geometry, False),
        ),
        "conv2d_backward_weight": (
            conv.backward_weight_kernel,
            (x4, _t(2, 4, 6, 6), [4, 3, 3, 3], *geometry, True),
        ),
        "sum_channels": (conv.sum_channels_kernel, (_t(2, 4, 6, 6),)),
        # bfloat16 (the CPU's bfloat16 passes): runs path (32 channels) and im2col
        "conv2d bfloat16": (
            conv.forward_kernel,
            (_t(2, 32, 6, 6).bfloat16(), _t(8, 32, 3, 3).bfloat16(), None, *geometry, False),
        ),
        "conv2d_backward_data bfloat16": (
            conv.backward_data_kernel,
            (_t(2, 4, 6, 6).bfloat16(), w4.bfloat16(), [2, 3, 6, 6], *geometry, False),
        ),
        "conv2d_backward_weight bfloat16": (
            conv.backward_weight_kernel,
            (_t(2, 32, 6, 6).bfloat16(), _t(2, 4, 6, 6).bfloat16(), [4, 32, 3, 3], *geometry, True),
        ),
        "sum_channels bfloat16": (conv.sum_channels_kernel, (_t(2, 4, 6, 6).bfloat16(),)),
        "batch_norm_train": (
            bn.forward_train,
            (bn_x, _t(3), _t(3), torch.zeros(3), torch.ones(3), 0.1, 1e-5),
        ),
        "batch_norm_train no running stats": (
            bn.forward_train,
            (bn_x, None, None, None, None, 0.1, 1e-5),
        ),
        "batch_norm_apply": (bn.apply_kernel, (bn_x, _t(3), _t(3), _t(3))),
        "batch_norm_eval": (bn.eval_kernel, (bn_x, _t(3), _t(3).abs(), _t(3), _t(3), 1e-5, True)),
        "batch_norm_eval no affine": (
            bn.eval_kernel,
            (bn_x, _t(3), _t(3).abs(), None, None, 1e-5, False),
        ),
        "batch_norm_backward_train": (
            bn.backward_train_kernel,
            (_t(4, 3, 5, 5), bn_x, _t(3), mean, invstd, [True, True, True]),
        ),
        "batch_norm_backward_train dx only": (
            bn.backward_train_kernel,
            (_t(4, 3, 5, 5), bn_x, None, mean, invstd, [True, False, False]),
        ),
        "batch_norm_backward_reduce": (
            bn.backward_reduce_kernel,
            (_t(4, 3, 5, 5), bn_x, mean, invstd),
        ),
        "batch_norm_stats": (bn.stats_kernel, (bn_x,)),
        "batch_norm_backward_apply": (
            bn.backward_apply_kernel,
            (_t(4, 3, 5, 5), bn_x, mean, invstd, _t(3), _t(3), _t(3)),
        ),
        "cross_entropy": (
            ce.rows_kernel,
            (_t(6, 5), torch.randint(0, 5, (6,)), None, None, -100, "mean", 0.1, True),
        ),
        "cross_entropy none": (
            ce.rows_kernel,
            (_t(6, 5), torch.randint(0, 5, (6,)), None, None, -100, "none", 0.0, True),
        ),
        "linear_cross_entropy": (
            ce.lce_kernel,
            (
                _t(6, 4),
                _t(5, 4),
                _t(5),
                torch.randint(0, 5, (6,)),
                -100,
                "mean",
                0.0,
                [True, True, True],
                None,
            ),
        ),
        "linear_cross_entropy none": (
            ce.lce_kernel,
            (
                _t(6, 4),
                _t(5, 4),
                None,
                torch.randint(0, 5, (6,)),
                -100,
                "none",
                0.1,
                [True, True, False],
                _t(6),
            ),
        ),
        "lstm_layer": (lstm.layer_kernel, (x_seq, h0, c0, lstm_w, 1, True)),
        "lstm_layer bidirectional": (
            lstm.layer_kernel,
            (x_seq, _t(2, 2, 4), _t(2, 2, 4), lstm_w2, 2, True),
        ),
        "lstm_layer no bias": (lstm.layer_kernel, (x_seq, h0, c0, lstm_w[:2], 1, False)),
        "lstm_layer_backward": (
            lstm.layer_backward_kernel,
            (_t(3, 2, 4), hn, cn, x_seq, h0, c0, y, lstm_w, saved, 1, True, [True] * 7),
        ),
        "lstm_cell": (lstm.cell_kernel, (x_step, h, c, *lstm_w[:3])),
        "lstm_cell no bias": (lstm.cell_kernel, (x_step, h, c, *lstm_w[:2], None)),
        "lstm_cell_backward": (
            lstm.cell_backward_kernel,
            (_t(2, 4), _t(2, 4), x_step, h, c, *lstm_w[:2], h1, c1, gates, [True] * 6),
        ),
        "lstm_cell_backward no state grads": (
            lstm.cell_backward_kernel,
            (None, _t(2, 4), x_step, h, c, *lstm_w[:2], h1, c1, gates, [True, False] * 3),
        ),
    }


CASES = _opcheck_cases()


@pytest.mark.parametrize("name", list(CASES))
def test_opcheck(name):
    prim, args = CASES[name]
    torch.library.opcheck(prim.op, args)


class Net(torch.nn.Module):
    """Every swappable layer type (SyncBatchNorm aside: it needs a process group)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.rnn = torch.nn.LSTM(6, 8, batch_first=True, bidirectional=True)
        self.cell = torch.nn.LSTMCell(16, 8)
        self.fc = torch.nn.Linear(8, 8)
        self.bn1 = torch.nn.BatchNorm1d(8, track_running_stats=False, affine=False)
        self.head = torch.nn.Linear(8, 4)
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x, y):
        f = torch.relu(self.bn(self.conv(x)))
        out, _ = self.rnn(f.mean(3).transpose(1, 2))  # 5 steps of 6 channels
        h, _ = self.cell(out[:, -1])
        return self.loss(self.head(torch.relu(self.bn1(self.fc(h)))), y)


def _swapped_pair():
    """(eager swapped Net, a copy to compile, inputs x, y)."""
    torch.manual_seed(0)
    eager = Net()
    nnkernels.swap_layers(eager)
    return eager, copy.deepcopy(eager), torch.randn(8, 1, 5, 5), torch.randint(0, 4, (8,))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_swapped_model_matches_eager(backend):
    eager, compiled_model, x, y = _swapped_pair()
    # torch.compile refuses every torch.nn.LSTM subclass unless allow_rnn is set.
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)  # no graph breaks
        for _ in range(2):  # training (batch statistics) twice, then eval
            a, b = compiled(x, y), eager(x, y)
            a.backward()
            b.backward()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # inductor fuses the torch ops around ours (rounding differs in the last bits); fc.bias
        # feeds a batch norm, so its exact gradient is 0 and both sides hold rounding noise
        scale = max(q.grad.abs().max().item() for q in eager.parameters())
        for (n, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4 * scale, msg=n)
        for p, q in zip(compiled_model.buffers(), eager.buffers()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        compiled_model.eval()
        eager.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, y), eager(x, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_linear_cross_entropy_matches_eager(backend, reduction):
    torch.manual_seed(0)
    x, w, b = torch.randn(7, 5), torch.randn(11, 5), torch.randn(11)
    t = torch.randint(0, 11, (7,))
    t[3] = -100

    def loss(x, w, b):
        out = NF.linear_cross_entropy(x, w, t, bias=b, reduction=reduction, label_smoothing=0.1)
        return out.sum() if reduction == "none" else out

    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    args = [a.clone().requires_grad_() for a in (x, w, b)]
    ref_args = [a.clone().requires_grad_() for a in (x, w, b)]
    got, want = compiled(*args), loss(*ref_args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, ref_args)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def _double_backward(fn, *args):
    y = fn(*args)
    (g,) = torch.autograd.grad(y, args[0], create_graph=True)
    g.sum().backward()
    return args[0].grad


DOUBLE_BACKWARD = {  # our op, torch's op (scalar results of an input that requires grad)
    "linear": (
        lambda x, w: NF.linear(x, w).pow(2).sum(),
        lambda x, w: torch.nn.functional.linear(x, w).pow(2).sum(),
        ((3, 4), (5, 4)),
    ),
    "conv2d": (
        lambda x, w: NF.conv2d(x, w).pow(2).sum(),
        lambda x, w: torch.nn.functional.conv2d(x, w).pow(2).sum(),
        ((2, 3, 5, 5), (4, 3, 3, 3)),
    ),
    "batch_norm": (
        lambda x, w: NF.batch_norm(x, None, None, w, None, training=True).pow(3).sum(),
        lambda x, w: (
            torch.nn.functional.batch_norm(x, None, None, w, None, training=True).pow(3).sum()
        ),
        ((4, 3, 2, 2), (3,)),
    ),
}


@pytest.mark.parametrize("op", list(DOUBLE_BACKWARD))
def test_double_backward_behaves_as_torch_eager_and_compiled(op):
    """Eagerly double backward matches torch's; compiled, it fails as torch's own op does
    (AOTAutograd has no double backward), not differently."""
    ours, theirs, shapes = DOUBLE_BACKWARD[op]
    torch.manual_seed(0)
    base = [torch.randn(*s, dtype=torch.float64) for s in shapes]
    want = _double_backward(theirs, *[b.clone().requires_grad_() for b in base])
    got = _double_backward(ours, *[b.clone().requires_grad_() for b in base])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    errors = []
    for fn in (ours, theirs):
        compiled = torch.compile(fn, backend="aot_eager")
        with pytest.raises(RuntimeError) as e:
            _double_backward(compiled, *[b.clone().requires_grad_() for b in base])
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "double backward" in errors[0]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_swapped_model_under_autocast(backend):
    """torch.compile (no graph breaks) of the swapped model under CPU bfloat16 autocast: the same
    loss, gradients and dtypes as the eager swapped model under autocast (conv2d and linear on the
    bfloat16 GEMM, batch norm and the LSTM cell in float32)."""
    eager, compiled_model, x, y = _swapped_pair()
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = compiled(x, y), eager(x, y)
        assert a.dtype == b.dtype == torch.float32
        a.backward()
        b.backward()
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    # (conv.bias and fc.bias feed batch norms: their exact gradients are 0, both sides hold noise)
    scale = max(q.grad.abs().max().item() for q in eager.parameters())
    for (n, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        assert p.grad.dtype == q.grad.dtype == torch.float32, n
        torch.testing.assert_close(p.grad, q.grad, rtol=3e-2, atol=3e-2 * scale, msg=n)
