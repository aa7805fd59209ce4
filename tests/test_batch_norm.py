"""nnkernels.functional.batch_norm, nn.BatchNorm1d/2d and nn.SyncBatchNorm against torch: outputs,
gradients of input / weight / bias, running statistics over several steps in both momentum modes,
eval mode, large-offset stability, layouts (NCHW, channels_last, (N, C), (N, C, L), 5-D), thread
splits, gradcheck, bad input, and SyncBatchNorm over two gloo processes vs one process on the
concatenated batch."""

import copy
import os

import nnkernels
import nnkernels.functional as NF
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference, free_port

SHAPES = [(16, 5), (8, 3, 17), (4, 6, 9, 7), (2, 4, 3, 5, 6), (3, 1, 8, 8), (64, 2), (2, 3, 1, 1)]
# rows shorter than 32: each image one run of C*S values (eval always; training from 4 images)
SHAPES += [(5, 33, 2, 2), (3, 7, 3, 5), (4, 9, 3), (6, 7, 3, 5), (8, 40, 4, 4), (4, 3, 5, 5)]


def _bn_case(
    shape,
    *,
    training,
    affine=True,
    running=True,
    channels_last=False,
    dtype=torch.float32,
    momentum=0.1,
    device="cpu",
):
    torch.manual_seed(7)
    c = shape[1]
    x = torch.randn(*shape, dtype=dtype) * 3 + 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(c, dtype=dtype) if affine else None
    b = torch.randn(c, dtype=dtype) if affine else None
    rm = torch.randn(c, dtype=dtype) if running else None
    rv = (torch.rand(c, dtype=dtype) + 0.5) if running else None

    def leaves(cast):
        return [
            None
            if t is None
            else cast(t).detach().clone(memory_format=torch.preserve_format).requires_grad_()
            for t in (x, w, b)
        ]

    def stats(cast):
        return [None if t is None else cast(t).clone() for t in (rm, rv)]

    def on(t):
        return t.to(device)

    ours_in, torch_in, ref_in = (
        leaves(on),
        leaves(on),
        leaves(lambda t: t.double()),
    )
    ours_rs, torch_rs, ref_rs = stats(on), stats(on), stats(lambda t: t.double())
    kw = dict(training=training, momentum=momentum, eps=1e-5)
    ours = NF.batch_norm(ours_in[0], *ours_rs, ours_in[1], ours_in[2], **kw)
    theirs = F.batch_norm(torch_in[0], *torch_rs, torch_in[1], torch_in[2], **kw)
    ref = F.batch_norm(ref_in[0], *ref_rs, ref_in[1], ref_in[2], **kw)
    n = x.numel() // c
    assert_matches_reference(ours, theirs, ref, k=n, name="out")
    for fmt in (
        (torch.contiguous_format, torch.channels_last)
        if ours.dim() == 4
        else (torch.contiguous_format,)
    ):
        assert ours.is_contiguous(memory_format=fmt) == theirs.is_contiguous(memory_format=fmt)
    if running:
        for a, t_, r, name in zip(ours_rs, torch_rs, ref_rs, ("running_mean", "running_var")):
            torch.testing.assert_close(a, t_, rtol=1e-5, atol=1e-5, msg=name)
            assert_matches_reference(a, t_, r, k=n, name=name)
    g = torch.randn_like(ref)
    want = [i for i, t in enumerate(ours_in) if t is not None]
    gs = torch.autograd.grad(ours, [ours_in[i] for i in want], on(g.to(dtype)))
    gs_t = torch.autograd.grad(theirs, [torch_in[i] for i in want], on(g.to(dtype)))
    gs_r = torch.autograd.grad(ref, [ref_in[i] for i in want], g)
    for i, a, t_, r in zip(want, gs, gs_t, gs_r):
        assert_matches_reference(a, t_, r, k=n, name=("grad input", "grad weight", "grad bias")[i])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm(shape, training, dtype):
    _bn_case(shape, training=training, dtype=dtype)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 6, 9, 7), (2, 3, 1, 1), (3, 1, 5, 5)])
def test_batch_norm_channels_last(shape, training):
    _bn_case(shape, training=training, channels_last=True)


@pytest.mark.parametrize("affine,running", [(False, True), (True, False), (False, False)])
def test_batch_norm_optional_parts(affine, running):
    _bn_case((4, 6, 5, 5), training=True, affine=affine, running=running)
    if running:
        _bn_case((4, 6, 5, 5), training=False, affine=affine, running=running)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize(
    "shape",
    [(2, 1, 90, 90), (8, 3, 40, 40), (4, 64, 12, 12), (300, 7), (2, 5, 2000), (40000, 1)],
)
def test_batch_norm_thread_splits(isa, threads, shape):
    """Every ISA's loops under every work split, large enough to fork: whole channels per thread
    (the fused sweep by channels), every channel shared by all threads (the cooperative sweep:
    C = 1, C = 3, one long row cut into pieces for (N, 1)), pixels per thread ((N, C))."""
    _bn_case(shape, training=True)
    _bn_case(shape, training=False)


@pytest.mark.parametrize("shape", [(4, 6, 9, 7), (3, 20, 7, 9), (2, 3, 1, 1)])
def test_batch_norm_channels_last_isa(isa, shape):
    """The pixel loops of every ISA: C below, at and above the vector width, odd pixel counts."""
    _bn_case(shape, training=True, channels_last=True)


def test_batch_norm_large_offset_is_stable():
    """mean 1e4, std 0.01: naive sum-of-squares variance would be lost in float32 rounding."""
    torch.manual_seed(0)
    x = 1e4 + 0.01 * torch.randn(8, 4, 16, 16)
    ours = NF.batch_norm(x, None, None, training=True)
    ref = F.batch_norm(x.double(), None, None, training=True)
    theirs = F.batch_norm(x, None, None, training=True)
    assert_matches_reference(ours, theirs, ref, k=x.numel() // 4)
    # with an eps far below the variance (1e-4) the output has unit variance per channel
    y = NF.batch_norm(x, None, None, training=True, eps=1e-12)
    torch.testing.assert_close(
        y.var(dim=(0, 2, 3), unbiased=False), torch.ones(4), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    "shape,channels_last",
    [
        ((8, 16, 27, 31), False),
        ((8, 16, 28, 30), True),
        ((8, 17, 27, 20), True),
        # rows of 49 and 25 values: one vector after the two-vector loop (AVX-512, AVX2)
        ((64, 16, 7, 7), False),
        ((3, 300, 5, 5), False),
    ],
)
def test_batch_norm_streamed_outputs(isa, stream_stores, shape, channels_last):
    """Outputs above the streaming threshold (the last-level cache's size; 64 KiB here) are
    written with non-temporal stores: rows that start unaligned (odd H*W), pixel rows aligned
    (C = 16) and not (C = 17, plain stores)."""
    _bn_case(shape, training=True, channels_last=channels_last)


def _grad_layout_case(x, g, device="cpu", torch_on_contiguous=False):
    """Forward and backward with gradient g (any layout) against torch and the float64 reference
    (torch_on_contiguous: torch's side on a contiguous copy of x, where torch's own kernel gets
    the layout wrong)."""
    c = x.shape[1]
    w, b = torch.randn(c), torch.randn(c)
    outs = []

    def same(t):
        return t.to(device)

    def theirs(t):
        return t.contiguous() if torch_on_contiguous and t.dim() == x.dim() else t

    for fn, cast in (
        (NF.batch_norm, same),
        (F.batch_norm, lambda t: theirs(same(t))),
        (F.batch_norm, lambda t: theirs(t.double())),
    ):
        xi = cast(x).detach().requires_grad_()
        wi, bi = cast(w).requires_grad_(), cast(b).requires_grad_()
        y = fn(xi, None, None, wi, bi, training=True)
        outs.append((y, torch.autograd.grad(y, (xi, wi, bi), cast(g))))
    (y, gs), (yt, gst), (yr, gsr) = outs
    n = x.numel() // c
    assert_matches_reference(y, yt, yr, k=n, name="out")
    for name, a, t_, r in zip(("grad input", "grad weight", "grad bias"), gs, gst, gsr):
        assert_matches_reference(a, t_, r, k=n, name=name)


def test_batch_norm_strided_views(isa):
    """Views in any layout: (N, C, L) with channels innermost (the pixel loops), batch-major rows
    far apart (the row loops), and every stride of its own (the strided loops)."""
    _grad_layout_case(torch.randn(8, 30, 6).transpose(1, 2), torch.randn(8, 6, 30))
    _grad_layout_case(torch.randn(6, 8, 30).transpose(0, 1), torch.randn(8, 6, 30))
    _grad_layout_case(torch.randn(8, 6, 30)[:, :, ::3], torch.randn(8, 6, 10))
    _grad_layout_case(torch.randn(6, 5, 9, 16)[:, :, 1:8, ::2], torch.randn(6, 5, 7, 8))
    # A size-1 W carries an arbitrary stride that torch's contiguity checks ignore: the rows step
    # by H's stride (they once stepped by W's and wrote past the output). torch 2.13's own CPU
    # backward returns a wrong input gradient for the first of these (error ~3): its side runs on
    # a contiguous copy.
    x = torch.randn(2, 5, 3).permute(0, 2, 1).unsqueeze(-1)
    _grad_layout_case(x, torch.randn(2, 3, 5, 1), torch_on_contiguous=True)
    _grad_layout_case(torch.randn(2, 3, 5).unsqueeze(2).transpose(2, 3), torch.randn(2, 3, 5, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_eval_strided_channel_args(dtype):
    """Eval with per-channel tensors that are strided views (stride-2 slices, a row of an expanded
    tensor), forward with and without autograd, and the gradients of input, weight and bias."""
    c = 5
    x = torch.randn(3, c, 4, 6, dtype=dtype, requires_grad=True)
    pool = torch.randn(4, 2 * c, dtype=dtype)
    mean, var = pool[0, ::2], pool[1, ::2].abs() + 0.5
    w = pool[2, ::2].clone().requires_grad_()
    b = pool[3, 1::2].clone().requires_grad_()
    w_view = w[None].expand(2, c)[1]  # stride-1 row of an expanded view: still a view
    ours = NF.batch_norm(x, mean, var, w_view, b, training=False, eps=1e-3)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.batch_norm(xd, mean.double(), var.double(), wd, bd, training=False, eps=1e-3)
    theirs = F.batch_norm(x, mean, var, w_view, b, training=False, eps=1e-3)
    assert_matches_reference(ours, theirs, ref, k=1, name="out")
    g = torch.randn_like(ref)
    for a, t_, r, name in zip(
        torch.autograd.grad(ours, (x, w, b), g.to(dtype)),
        torch.autograd.grad(theirs, (x, w, b), g.to(dtype)),
        torch.autograd.grad(ref, (xd, wd, bd), g),
        ("grad input", "grad weight", "grad bias"),
    ):
        assert_matches_reference(a, t_, r, k=x.numel() // c, name=name)
    with torch.no_grad():
        y = NF.batch_norm(x, mean, var, w_view, b, training=False, eps=1e-3)
    assert_matches_reference(y, theirs.detach(), ref.detach(), k=1, name="out (no grad)")


def test_batch_norm_gradient_in_another_layout():
    """x channels_last with a contiguous gradient, x contiguous with a channels_last one, and an
    expanded (stride 0) gradient from a sum: all as torch."""
    x = torch.randn(4, 6, 9, 7)
    g = torch.randn(4, 6, 9, 7)
    _grad_layout_case(x.to(memory_format=torch.channels_last), g)
    _grad_layout_case(x, g.to(memory_format=torch.channels_last))
    _grad_layout_case(x, torch.ones(()).expand(4, 6, 9, 7))


def test_batch_norm_gradcheck():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    train = lambda a, c, d: NF.batch_norm(a, None, None, c, d, training=True)  # noqa: E731
    evalm = lambda a, c, d: NF.batch_norm(a, rm, rv, c, d, training=False)  # noqa: E731
    for fn in (train, evalm):
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


# ------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    "cls,shape",
    [("BatchNorm1d", (16, 6)), ("BatchNorm1d", (8, 6, 10)), ("BatchNorm2d", (4, 6, 7, 7))],
)
def test_module_running_stats_over_steps(cls, shape, momentum):
    ref = getattr(torch.nn, cls)(6, momentum=momentum)
    ours = getattr(nnkernels.nn, cls)(6, momentum=momentum)
    assert isinstance(ours, getattr(torch.nn, cls))
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    torch.manual_seed(3)
    for _ in range(5):
        x = torch.randn(*shape) * 2 + 1
        y, y_t = ours(x), ref(x)
        torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(
            getattr(ours, name), getattr(ref, name), rtol=1e-5, atol=1e-5, msg=name
        )
    ours.eval(), ref.eval()
    x = torch.randn(*shape)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_module_options():
    for kw in (dict(affine=False), dict(track_running_stats=False), dict(eps=1e-3, momentum=0.3)):
        ref, ours = torch.nn.BatchNorm2d(5, **kw), nnkernels.nn.BatchNorm2d(5, **kw)
        assert list(ours.state_dict()) == list(ref.state_dict())
        x = torch.randn(3, 5, 4, 4)
        for mode in ("train", "eval"):
            getattr(ref, mode)(), getattr(ours, mode)()
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected 4D input"):
        nnkernels.nn.BatchNorm2d(5)(torch.randn(3, 5))


# ------------------------------------------------------------------------------------ bad input


def test_batch_norm_bad_input():
    x = torch.randn(4, 3, 5)

    def raises(exc, match, *args, **kwargs):
        with pytest.raises(exc, match=match):
            NF.batch_norm(*args, **kwargs)

    raises(
        ValueError,
        r"running_mean must have shape \(3,\)",
        x,
        torch.zeros(4),
        torch.ones(3),
        training=True,
    )
    raises(ValueError, r"running_var must have shape \(3,\)", x, torch.zeros(3), torch.ones(2))
    raises(
        ValueError, r"weight must have shape \(3,\)", x, None, None, torch.ones(4), training=True
    )
    raises(
        ValueError, "more than 1 value per channel", torch.randn(1, 3), None, None, training=True
    )
    raises(
        ValueError,
        "more than 1 value per channel",
        torch.randn(1, 3, 1, 1),
        None,
        None,
        training=True,
    )
    raises(ValueError, "must be given when training=False", x, None, None, training=False)
    raises(ValueError, r"input must be \(N, C, \*\)", torch.randn(5), None, None, training=True)
    raises(
        TypeError,
        "running_mean has dtype float64",
        x,
        torch.zeros(3, dtype=torch.float64),
        torch.ones(3),
    )
    raises(TypeError, "input must be a floating-point tensor", x.long(), None, None, training=True)


# ------------------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not nnkernels.cuda_available(), reason="no CUDA GPU visible")


@cuda
@pytest.mark.parametrize(
    "shape", [(16, 5), (8, 3, 17), (4, 6, 9, 7), (2, 4, 3, 5, 6), (3, 1, 8, 8), (2, 3, 1, 1)]
)
@pytest.mark.parametrize("training", [True, False])
def test_cuda_batch_norm(shape, training):
    _bn_case(shape, training=training, device="cuda")


@cuda
@pytest.mark.parametrize(
    "shape", [(4, 6, 9, 7), (3, 40, 7, 9), (2, 3, 1, 1), (32, 64, 14, 14), (2, 1, 300, 300)]
)
def test_cuda_batch_norm_channels_last_and_big(shape):
    """Both CUDA layouts, C below / at / above a warp, channels with more values than one block
    takes (several partial sums per channel)."""
    _bn_case(shape, training=True, device="cuda")
    if len(shape) == 4:
        _bn_case(shape, training=True, channels_last=True, device="cuda")


@cuda
@pytest.mark.parametrize("affine,running", [(False, True), (True, False), (False, False)])
def test_cuda_batch_norm_optional_parts(affine, running):
    _bn_case((4, 6, 5, 5), training=True, affine=affine, running=running, device="cuda")


@cuda
def test_cuda_batch_norm_layouts_and_offset():
    x = torch.randn(4, 6, 9, 7)
    g = torch.randn(4, 6, 9, 7)
    _grad_layout_case(x.to(memory_format=torch.channels_last), g, device="cuda")
    _grad_layout_case(x, torch.ones(()).expand(4, 6, 9, 7), device="cuda")
    _grad_layout_case(torch.randn(8, 30, 6).transpose(1, 2), torch.randn(8, 6, 30), device="cuda")
    _grad_layout_case(torch.randn(6, 5, 9, 16)[:, :, 1:8, ::2], torch.randn(6, 5, 7, 8), "cuda")
    xo = 1e4 + 0.01 * torch.randn(8, 4, 16, 16)
    ours = NF.batch_norm(xo.cuda(), None, None, training=True)
    ref = F.batch_norm(xo.double(), None, None, training=True)
    assert_matches_reference(ours, F.batch_norm(xo.cuda(), None, None, training=True), ref, k=2048)


@cuda
def test_cuda_batch_norm_module_on_a_side_stream():
    """The kernels run on torch's current stream: results are right when read on that stream."""
    torch.manual_seed(0)
    ours, ref = nnkernels.nn.BatchNorm2d(16).cuda(), torch.nn.BatchNorm2d(16).cuda()
    side = torch.cuda.Stream()
    x = torch.randn(8, 16, 20, 20, device="cuda") * 2 + 1
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            y = ours(x)
            y_ref = ref(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-5)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


@cuda
def test_cuda_batch_norm_rejects_float64():
    with pytest.raises(NotImplementedError, match="float32"):
        NF.batch_norm(
            torch.randn(4, 3, 5, dtype=torch.float64, device="cuda"), None, None, training=True
        )


# ------------------------------------------------------------------------------- SyncBatchNorm


def _sync_worker(rank, world, port, channels_last):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(0)
        full = torch.randn(8, 5, 6, 6) * 3 + 1
        if channels_last:
            full = full.to(memory_format=torch.channels_last)
        g_full = torch.randn_like(full)
        ref = torch.nn.BatchNorm2d(5, momentum=None)
        with torch.no_grad():
            ref.weight.copy_(torch.randn(5))
            ref.bias.copy_(torch.randn(5))
        net = nnkernels.nn.SyncBatchNorm.convert_sync_batchnorm(
            torch.nn.Sequential(copy.deepcopy(ref))
        )
        ours = net[0]
        assert isinstance(ours, nnkernels.nn.SyncBatchNorm)
        # this rank's half of the batch (uneven split: 3 + 5)
        lo, hi = (0, 3) if rank == 0 else (3, 8)
        for _ in range(3):
            x = full[lo:hi].clone().requires_grad_()
            y = ours(x)
            (y * g_full[lo:hi]).sum().backward()
            x_ref = full.clone().requires_grad_()
            y_ref = ref(x_ref)
            (y_ref * g_full).sum().backward()
            torch.testing.assert_close(y, y_ref[lo:hi], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(x.grad, x_ref.grad[lo:hi], rtol=1e-4, atol=1e-5)
            grads = torch.stack([ours.weight.grad, ours.bias.grad])
            dist.all_reduce(grads)  # local sums, as DDP would add them
            torch.testing.assert_close(grads[0], ref.weight.grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(grads[1], ref.bias.grad, rtol=1e-4, atol=1e-4)
            for m in (ours, ref):
                m.weight.grad = m.bias.grad = None
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
        assert int(ours.num_batches_tracked) == 3
        ours.eval()  # eval: no synchronisation, running statistics
        torch.testing.assert_close(ours(full[lo:hi]), ref.eval()(full[lo:hi]), rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("channels_last", [False, True])
def test_sync_batch_norm_two_gloo_processes(channels_last):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_sync_worker, args=(2, free_port(), channels_last), nprocs=2, join=True)


def test_sync_batch_norm_without_distributed_is_batch_norm():
    ref = torch.nn.BatchNorm2d(4)
    ours = nnkernels.nn.SyncBatchNorm(4)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)


def test_convert_sync_batchnorm_shares_parameters():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        nnkernels.nn.BatchNorm2d(4),
    )
    w1, rm1 = net[1].weight, net[1].running_mean
    out = nnkernels.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert isinstance(out[1], nnkernels.nn.SyncBatchNorm) and isinstance(
        out[3], nnkernels.nn.SyncBatchNorm
    )
    assert out[1].weight is w1 and out[1].running_mean is rm1
    assert isinstance(out[0], torch.nn.Conv2d)
