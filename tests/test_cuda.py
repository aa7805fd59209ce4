"""CUDA kernels against torch (cuBLAS, TF32 off). Skipped where no GPU is visible."""

import nnkernels
import nnkernels.functional as NF
import nnkernels.kernels as K
import pytest
import torch
from conftest import assert_matches_reference

pytestmark = pytest.mark.skipif(not nnkernels.cuda_available(), reason="no CUDA GPU visible")


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _grads(fn, tensors):
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    g = torch.randn_like(out)
    return out, torch.autograd.grad(out, leaves, g), g


@pytest.mark.parametrize(
    "M,N,K",
    [(1, 1, 1), (7, 17, 129), (128, 128, 8), (129, 127, 9), (300, 200, 1000), (0, 4, 3), (4, 5, 0)],
)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_cuda_matmul(M, N, K, ta, tb):
    a = (torch.randn(K, M).mT if ta else torch.randn(M, K)).cuda()
    b = (torch.randn(N, K).mT if tb else torch.randn(K, N)).cuda()
    ours, (da, db), g = _grads(NF.matmul, (a, b))
    theirs, (da_t, db_t), _ = _grads(torch.matmul, (a, b))
    ref, (da_r, db_r), _ = _grads(torch.matmul, (a.double(), b.double()))
    assert_matches_reference(ours, theirs, ref, k=K, name="out")
    assert_matches_reference(da, da_t, da_r, k=N, name="grad a")
    assert_matches_reference(db, db_t, db_r, k=M, name="grad b")


def test_cuda_matmul_unaligned_and_strided():
    a = torch.randn(70, 91, device="cuda")[1:, 1:]  # misaligned base, odd row stride
    b = torch.randn(200, 50, device="cuda")[::2, 1::2]  # no unit stride
    ref = a.double() @ b.double()
    assert_matches_reference(NF.matmul(a, b), a @ b, ref, k=a.shape[1])


def test_cuda_batched():
    a, b = torch.randn(5, 33, 47, device="cuda"), torch.randn(47, 29, device="cuda")
    assert_matches_reference(NF.matmul(a, b), a @ b, a.double() @ b.double(), k=47)
    a3, b3 = torch.randn(7, 33, 47, device="cuda"), torch.randn(7, 47, 29, device="cuda")
    assert_matches_reference(NF.matmul(a3, b3), a3 @ b3, a3.double() @ b3.double(), k=47)


@pytest.mark.parametrize("bias", [True, False])
def test_cuda_linear(bias):
    x = torch.randn(3, 50, 784, device="cuda")
    w = torch.randn(300, 784, device="cuda") / 28
    b = torch.randn(300, device="cuda") if bias else None
    args = (x, w, b) if bias else (x, w)
    ours, gs, g = _grads(lambda *t: NF.linear(*t), args)
    theirs, gs_t, _ = _grads(lambda *t: torch.nn.functional.linear(*t), args)
    ref, gs_r, _ = _grads(lambda *t: torch.nn.functional.linear(*t), [t.double() for t in args])
    assert_matches_reference(ours, theirs, ref, k=785)
    for name, k, o, t, r in zip(("input", "weight", "bias"), (300, 150, 150), gs, gs_t, gs_r):
        assert_matches_reference(o, t, r, k=k, name=f"grad {name}")


def test_cuda_runs_on_the_current_stream():
    s = torch.cuda.Stream()
    a, b = torch.randn(512, 512, device="cuda"), torch.randn(512, 512, device="cuda")
    with torch.cuda.stream(s):
        out = NF.matmul(a, b)
    s.synchronize()
    torch.testing.assert_close(out, a @ b, rtol=1e-4, atol=1e-3)


def test_cuda_kernels_and_errors():
    a, b = torch.randn(8, 5, device="cuda"), torch.randn(5, 3, device="cuda")
    out = torch.empty(8, 3, device="cuda")
    K.matmul(a, b, out)
    torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="on cpu|same device|one device"):
        NF.matmul(a, b.cpu())
    with pytest.raises(NotImplementedError, match="float64"):
        NF.matmul(a.double(), b.double())


def test_cuda_gradcheck_float32_path():
    """fp64 is CPU-only on CUDA; check the CUDA gradients by finite differences in float32."""
    x = torch.randn(4, 6, device="cuda", requires_grad=True)
    w = torch.randn(3, 6, device="cuda", requires_grad=True)
    y = NF.linear(x, w)
    y.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(4, 3, device="cuda").mT @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "N,C,H,W,K,R,S,kw",
    [
        (2, 8, 9, 9, 16, 3, 3, dict(padding=1)),
        (3, 6, 11, 12, 7, 3, 3, dict(stride=2, padding=1)),
        (2, 4, 13, 14, 6, 5, 3, dict(dilation=(2, 1), padding="same")),
        (2, 12, 9, 9, 12, 3, 3, dict(groups=12, padding=1)),
        (2, 16, 14, 14, 32, 1, 1, dict(stride=2)),
        (4, 1, 28, 28, 16, 3, 3, dict()),
        (1, 32, 34, 33, 20, 3, 3, dict(padding=1)),
        (2, 300, 9, 8, 260, 3, 3, dict(padding=1)),  # several M / N / K tiles
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_conv2d(N, C, H, W, K, R, S, kw, channels_last):
    g = kw.get("groups", 1)
    x = torch.randn(N, C, H, W, device="cuda")
    w = torch.randn(K, C // g, R, S, device="cuda") / (C // g * R * S) ** 0.5
    b = torch.randn(K, device="cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    fn = lambda *t: NF.conv2d(*t, **kw)  # noqa: E731
    ref_fn = lambda *t: torch.nn.functional.conv2d(*t, **kw)  # noqa: E731
    ours, gs, gy = _grads(fn, (x, w, b))
    theirs, gs_t, _ = _grads(ref_fn, (x, w, b))
    ref, gs_r, _ = _grads(ref_fn, [t.double() for t in (x, w, b)])
    assert_matches_reference(ours, theirs, ref, k=C // g * R * S + 1, name="out")
    n_pix = ref.shape[0] * ref.shape[2] * ref.shape[3]
    for name, k, o, t, r in zip(
        ("input", "weight", "bias"), (K // g * R * S, n_pix, n_pix), gs, gs_t, gs_r
    ):
        assert_matches_reference(o, t, r, k=k, name=f"grad {name}")


def test_cuda_conv2d_module_and_stream():
    m = nnkernels.nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect").cuda()
    ref = torch.nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect").cuda()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 4, 10, 10, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = m(x)
    s.synchronize()
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-4)
