"""nnkernels.swap_layers / restore_layers: every supported torch layer in a model tree swapped in
place (same module, Parameter and buffer objects, so an optimizer built before keeps working),
same outputs and gradients as the torch model, the same parameters after 5 SGD steps, include /
exclude by type and name pattern, unsupported configurations left alone with a reason, and
restore."""

import copy

import nnkernels
import pytest
import torch


class Net(torch.nn.Module):
    """Every layer type swap_layers knows: conv + batch norm, MLP, LSTM, LSTMCell, the loss."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 4, 3),
        )
        self.rnn = torch.nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.cell = torch.nn.LSTMCell(12, 5)
        self.head = torch.nn.Sequential(
            torch.nn.Linear(5, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.ReLU(),
            torch.nn.Linear(16, 3),
        )
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x, target):
        f = self.features(x)  # (N, 4, 6, 6)
        seq = f.mean(2).transpose(1, 2)  # (N, 6, 4): a sequence of 6 steps
        out, _ = self.rnn(seq)
        h, _ = self.cell(out[:, -1])
        return self.loss(self.head(h), target)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def test_swap_keeps_objects_and_matches_torch():
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # built before the swap
    report = nnkernels.swap_layers(model)
    names = {n for n, _ in report.changed}
    assert names == {
        "features.0",
        "features.1",
        "features.3",
        "rnn",
        "cell",
        "head.0",
        "head.1",
        "head.3",
        "loss",
    }
    assert isinstance(model.features[0], nnkernels.nn.Conv2d)
    assert isinstance(model.rnn, nnkernels.nn.LSTM) and isinstance(model.rnn, torch.nn.LSTM)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert list(model.state_dict()) == list(ref.state_dict())

    x, t = _data()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss = m(x, t)
            loss.backward()
            if step == 0:
                m._first = (loss.detach(), [p.grad.clone() for p in m.parameters()])
            o.step()
    (la, ga), (lb, gb) = model._first, ref._first
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-6)
    # 1e-4 relative to the gradients' scale: the bias of a Linear followed by batch norm has a
    # gradient of exactly 0 in exact arithmetic, pure rounding noise (~1e-5) on either side.
    scale = max(g.abs().max().item() for g in gb)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=n)
    for a, b in zip(model.buffers(), ref.buffers()):  # running stats, num_batches_tracked
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)

    back = nnkernels.restore_layers(model)
    assert len(back) == len(report)
    assert type(model.rnn) is torch.nn.LSTM and type(model.features[0]) is torch.nn.Conv2d
    assert all(p is params[n] for n, p in model.named_parameters())
    assert len(nnkernels.restore_layers(model)) == 0  # nothing left to undo


def test_swap_include_exclude_and_report():
    model = Net()
    r = nnkernels.swap_layers(model, include=[torch.nn.Linear, "rnn"], exclude="head.3")
    assert {n for n, _ in r.changed} == {"head.0", "rnn"}
    left = {n: why for n, _, why in r.left}
    assert left["head.3"] == "excluded" and left["features.0"] == "not in include"
    text = str(r)
    assert "swapped 2 layer(s)" in text and "head.3" in text and "excluded" in text
    r2 = nnkernels.swap_layers(model)
    assert ("rnn", "LSTM", "already an nnkernels layer") in r2.left
    with pytest.raises(TypeError, match="include takes layer types"):
        nnkernels.swap_layers(model, include=[3])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        nnkernels.swap_layers("model")


def test_swap_leaves_what_it_cannot_compute():
    class MyLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4, device="meta"),
        MyLinear(4, 4),
        torch.nn.LSTM(4, 6, proj_size=2),
        torch.nn.Linear(4, 4),
        torch.nn.Linear(4, 4).half(),  # float16 runs (on float32 copies): swapped
    )
    r = nnkernels.swap_layers(model)
    assert [n for n, _ in r.changed] == ["3", "4"]
    left = {n: why for n, _, why in r.left}
    assert "is on meta" in left["0"]
    assert "subclass of torch.nn.Linear" in left["1"]
    assert "proj_size=2" in left["2"]
    assert type(model[0]) is torch.nn.Linear


def test_swap_root_module_and_modes():
    lin = torch.nn.Linear(5, 3).double().eval()
    nnkernels.swap_layers(lin)
    assert isinstance(lin, nnkernels.nn.Linear) and not lin.training
    assert lin.weight.dtype == torch.float64
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    nnkernels.restore_layers(lin)
    assert type(lin) is torch.nn.Linear


def test_swap_shared_module_matches_any_of_its_names():
    lin = torch.nn.Linear(3, 3)
    model = torch.nn.ModuleDict({"body": torch.nn.Sequential(lin), "head": lin})
    r = nnkernels.swap_layers(model, exclude=["head"])
    assert not r.changed and type(lin) is torch.nn.Linear
    r = nnkernels.swap_layers(model, include=["head"])
    assert len(r.changed) == 1 and isinstance(lin, nnkernels.nn.Linear)


def test_restore_leaves_a_layer_changed_after_the_swap():
    from torch.nn.utils import parametrize

    class Identity(torch.nn.Module):
        def forward(self, w):
            return w

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    nnkernels.swap_layers(model)
    parametrize.register_parametrization(model[0], "weight", Identity())
    r = nnkernels.restore_layers(model)
    assert [n for n, _ in r.changed] == ["1"]
    assert "class changed since the swap" in r.left[0][2]
    assert model[0].weight.shape == (3, 3)  # the parametrization still works


def test_swapped_layers_follow_autocast():
    """Under autocast torch computes matmul, Linear, Conv2d and the LSTMs in bfloat16; nnkernels'
    functions and layers return torch's dtypes there (computed by nnkernels: test_bf16_gemm,
    test_bf16_conv2d, test_low_precision), with values within bfloat16 rounding of torch's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    ref = copy.deepcopy(model)
    nnkernels.swap_layers(model)
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(x), ref(x)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a, b)

    conv, rnn, cell = torch.nn.Conv2d(2, 3, 3), torch.nn.LSTM(4, 5, 2), torch.nn.LSTMCell(4, 5)
    twins = [copy.deepcopy(m) for m in (conv, rnn, cell)]
    for m in twins:
        nnkernels.swap_layers(m)
    img, seq = torch.randn(2, 2, 6, 6), torch.randn(3, 2, 4)

    def outcome(fn):  # torch's own LSTM has no bfloat16 kernel on some CPUs (ours runs there)
        try:
            return fn()
        except RuntimeError as e:
            return type(e)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        pairs = [
            (lambda: twins[0](img), lambda: conv(img)),
            (lambda: twins[1](seq)[0], lambda: rnn(seq)[0]),
            (lambda: twins[1](seq[:, 0])[1][1], lambda: rnn(seq[:, 0])[1][1]),  # unbatched
            (lambda: twins[2](seq[0])[0], lambda: cell(seq[0])[0]),
            (lambda: nnkernels.functional.matmul(x, x.T), lambda: torch.matmul(x, x.T)),
        ]
        results = [(outcome(a), outcome(b)) for a, b in pairs]
    for ours, theirs in results:
        assert isinstance(ours, torch.Tensor)
        if not isinstance(theirs, torch.Tensor):
            continue
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)
