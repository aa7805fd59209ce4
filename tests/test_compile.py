"""torch.compile: nnkernels' ops are torch.library custom ops while torch.compile traces, so a
swapped model compiles with fullgraph=True (no graph breaks) and gives the eager results;
torch.library.opcheck passes for every op."""

import copy

import nnkernels
import pytest
import torch
from nnkernels import _library as L

# torch 2.13 warns about its own torch.jit use when dynamo is imported
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


def _t(*shape, grad=True, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _opcheck_cases():
    torch.manual_seed(0)
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], 1, False)
    x4, w4 = _t(2, 3, 6, 6), _t(4, 3, 3, 3)
    lstm_w = [_t(16, 3), _t(16, 4), _t(16), _t(16)]
    lstm_w2 = lstm_w + [_t(16, 3), _t(16, 4), _t(16), _t(16)]
    return {
        "mm": (L.mm, (_t(5, 7), _t(7, 3))),
        "mm batched": (L.mm, (_t(2, 5, 7), _t(2, 7, 3))),
        "sum_rows": (L.sum_rows, (_t(6, 5),)),
        "linear": (L.linear, (_t(5, 7), _t(3, 7), _t(3))),
        "linear no bias": (L.linear, (_t(5, 7), _t(3, 7), None)),
        "conv2d": (L.conv2d, (x4, w4, _t(4), *geometry)),
        "conv2d_backward_data": (
            L.conv2d_backward_data,
            (_t(2, 4, 6, 6, grad=False), w4.detach(), [2, 3, 6, 6], *geometry),
        ),
        "conv2d_backward_weight": (
            L.conv2d_backward_weight,
            (x4.detach(), _t(2, 4, 6, 6, grad=False), [4, 3, 3, 3], *geometry, True),
        ),
        "batch_norm_train": (
            L.batch_norm_train,
            (_t(4, 3, 5, 5), _t(3), _t(3), torch.zeros(3), torch.ones(3), 0.1, 1e-5),
        ),
        "batch_norm_train no running stats": (
            L.batch_norm_train,
            (_t(4, 3, 5, 5), None, None, None, None, 0.1, 1e-5),
        ),
        "batch_norm_eval": (
            L.batch_norm_eval,
            (_t(4, 3, 5, 5), _t(3), _t(3), torch.randn(3), torch.rand(3) + 0.5, 1e-5),
        ),
        "cross_entropy": (
            L.cross_entropy,
            (_t(6, 5), torch.randint(0, 5, (6,)), None, None, -100, "mean", 0.1, True),
        ),
        "cross_entropy none": (
            L.cross_entropy,
            (_t(6, 5), torch.randint(0, 5, (6,)), None, None, -100, "none", 0.0, True),
        ),
        "lstm_layer": (L.lstm_layer, (_t(3, 2, 3), _t(1, 2, 4), _t(1, 2, 4), lstm_w, 1, True)),
        "lstm_layer bidirectional": (
            L.lstm_layer,
            (_t(3, 2, 3), _t(2, 2, 4), _t(2, 2, 4), lstm_w2, 2, True),
        ),
        "lstm_layer no bias": (
            L.lstm_layer,
            (_t(3, 2, 3), _t(1, 2, 4), _t(1, 2, 4), lstm_w[:2], 1, False),
        ),
    }


CASES = _opcheck_cases()


@pytest.mark.parametrize("name", list(CASES))
def test_opcheck(name):
    op, args = CASES[name]
    torch.library.opcheck(op, args)


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


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_swapped_model_matches_eager(backend):
    torch.manual_seed(0)
    eager = Net()
    nnkernels.swap_layers(eager)
    compiled_model = copy.deepcopy(eager)
    x, y = torch.randn(8, 1, 5, 5), torch.randint(0, 4, (8,))
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
