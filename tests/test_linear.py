"""nnkernels.functional.linear and nnkernels.nn.Linear against torch: outputs, the gradients of
input, weight and bias, leading dims, strides, gradcheck, and module/state_dict behaviour."""

import copy

import nnkernels
import nnkernels.functional as NF
import pytest
import torch
from conftest import assert_matches_reference


def _check_linear(x, w, b):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    torch_leaves = [
        t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)
    ]
    ref_leaves = [
        t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)
    ]

    ours = NF.linear(*leaves)
    theirs = torch.nn.functional.linear(*torch_leaves)
    ref = torch.nn.functional.linear(*ref_leaves)
    in_f = w.shape[1]
    assert_matches_reference(ours, theirs, ref, k=in_f + 1, name="out")

    g = torch.randn_like(ref)
    want = [i for i, t in enumerate(leaves) if t is not None]
    gs = torch.autograd.grad(ours, [leaves[i] for i in want], g.to(ours.dtype), allow_unused=True)
    gs_t = torch.autograd.grad(theirs, [torch_leaves[i] for i in want], g.to(theirs.dtype))
    gs_r = torch.autograd.grad(ref, [ref_leaves[i] for i in want], g)
    rows = max(1, x.numel() // max(1, in_f))
    ks = {0: w.shape[0], 1: rows, 2: rows}
    for i, a, t, r in zip(want, gs, gs_t, gs_r):
        assert_matches_reference(
            a, t, r, k=ks[i], name=("grad input", "grad weight", "grad bias")[i]
        )


@pytest.mark.parametrize(
    "lead,in_f,out_f",
    [
        ((256,), 784, 300),  # the course MLP's first layer
        ((1,), 784, 300),  # small batches: computed as C^T = W . x^T, as dot products
        ((2,), 67, 13),  # dot products: rows in blocks of 4 and a tail, k tail past the lanes
        ((3,), 129, 6),
        ((4,), 64, 2),
        ((5,), 64, 7),  # 5 columns: the tile path again
        ((8,), 512, 2048),
        ((64,), 129, 1000),
        ((64,), 300, 100),
        ((64,), 100, 10),
        ((1,), 1, 1),
        ((7,), 17, 129),
        ((3, 5), 33, 17),  # leading dims folded into M
        ((2, 3, 4), 16, 14),
        ((), 20, 6),  # 1-D input
        ((0,), 20, 6),  # empty batch
        ((5,), 0, 6),  # no input features: output is the bias
        ((5,), 8, 0),  # no outputs
    ],
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear(isa, lead, in_f, out_f, bias, dtype):
    x = torch.randn(*lead, in_f, dtype=dtype)
    w = torch.randn(out_f, in_f, dtype=dtype) / max(1, in_f) ** 0.5
    b = torch.randn(out_f, dtype=dtype) if bias else None
    _check_linear(x, w, b)


def test_linear_strided_arguments(isa):
    x = torch.randn(40, 3, 90)[:, 1, ::3]  # (40, 30), non-contiguous
    w = torch.randn(30, 50).mT  # (50, 30), a transposed (tied) weight
    b = torch.randn(100)[::2]  # strided bias
    _check_linear(x, w, b)


def test_linear_non_viewable_input(isa):
    x = torch.randn(6, 4, 11).transpose(0, 1)  # (4, 6, 11): reshape must copy
    _check_linear(x, torch.randn(5, 11), torch.randn(5))


def test_linear_gradcheck():
    x = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(NF.linear, (x, w, b))
    assert torch.autograd.gradgradcheck(NF.linear, (x, w, b))
    assert torch.autograd.gradcheck(NF.linear, (x, w, None))


def test_linear_only_needed_grads():
    x = torch.randn(4, 6)
    w = torch.randn(5, 6, requires_grad=True)
    b = torch.randn(5)
    NF.linear(x, w, b).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(4, 5).mT @ x)


# ------------------------------------------------------------------------------------ nn.Linear


@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_torch(bias):
    torch.manual_seed(1)
    ref = torch.nn.Linear(31, 17, bias=bias)
    ours = nnkernels.nn.Linear(31, 17, bias=bias)
    assert isinstance(ours, torch.nn.Linear)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(8, 31)
    y, y_t = ours(x), ref(x)
    assert_matches_reference(y, y_t, copy.deepcopy(ref).double()(x.double()), k=32)
    y.sum().backward()
    y_t.sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


def test_module_checkpoint_round_trip(tmp_path):
    ours = nnkernels.nn.Linear(12, 5)
    path = tmp_path / "ckpt.pt"
    torch.save(ours.state_dict(), path)
    back = torch.nn.Linear(12, 5)
    back.load_state_dict(torch.load(path))
    again = nnkernels.nn.Linear(12, 5)
    again.load_state_dict(back.state_dict())
    x = torch.randn(3, 12)
    torch.testing.assert_close(again(x), back(x), rtol=1e-6, atol=1e-6)


def test_module_constructor_arguments():
    m = nnkernels.nn.Linear(in_features=6, out_features=4, bias=False, dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.bias is None
    assert m.in_features == 6 and m.out_features == 4
    assert "in_features=6, out_features=4, bias=False" in repr(m)
    assert m(torch.randn(2, 6, dtype=torch.float64)).dtype == torch.float64


def test_module_trains_like_torch():
    """Five SGD steps on the same data give the same parameters."""
    torch.manual_seed(2)
    ref = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    ours = torch.nn.Sequential(
        nnkernels.nn.Linear(20, 16), torch.nn.ReLU(), nnkernels.nn.Linear(16, 3)
    )
    ours.load_state_dict(ref.state_dict())
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    x, y = torch.randn(64, 20), torch.randint(0, 3, (64,))
    for _ in range(5):
        for model, opt in ((ref, opt_r), (ours, opt_o)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for (n, p_r), p_o in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_o, p_r, rtol=1e-4, atol=1e-5, msg=n)
