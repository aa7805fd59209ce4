"""nnkernels.functional.conv2d and nnkernels.nn.Conv2d against torch: outputs and the gradients of
input, weight and bias on shapes that hit every path (merged columns for small maps, one image at
a time for larger ones, im2col chunks, pointwise GEMM, groups and depthwise, strides, dilation,
asymmetric 'same' padding, C = 1, batch of 1, kernel as large as the input), memory formats,
threads, every ISA, gradcheck, padding modes and bad input; Winograd F(2x2, 3x3) for 3x3 stride 1."""

import copy

import nnkernels
import nnkernels.functional as NF
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference

# (name, N, C, H, W, K, R, S, kwargs)
CASES = [
    ("3x3 pad1", 2, 8, 9, 9, 16, 3, 3, dict(padding=1)),
    ("3x3 valid", 3, 5, 10, 7, 6, 3, 3, dict()),
    ("3x3 stride2 pad1", 2, 6, 11, 12, 7, 3, 3, dict(stride=2, padding=1)),
    ("5x5 dilation2", 2, 3, 13, 14, 4, 5, 5, dict(dilation=2, padding=2)),
    ("non-square 3x2 stride (2,1)", 2, 4, 9, 8, 5, 3, 2, dict(stride=(2, 1), padding=(1, 0))),
    ("1x1 pointwise", 3, 16, 7, 9, 24, 1, 1, dict()),
    ("1x1 stride 2", 2, 16, 14, 14, 32, 1, 1, dict(stride=2)),
    ("1x1 padded", 2, 4, 5, 5, 6, 1, 1, dict(padding=1)),
    ("groups 2", 2, 8, 8, 8, 12, 3, 3, dict(groups=2, padding=1)),
    ("depthwise", 2, 12, 9, 9, 12, 3, 3, dict(groups=12, padding=1)),
    ("depthwise x2 multiplier", 2, 6, 9, 9, 12, 3, 3, dict(groups=6, stride=2)),
    # multiplier 1 runs channels-last in blocks of 32 channels (a 8-channel tail here); > 256
    # output pixels: the weight gradient's partial sums split the rows
    ("depthwise: channel blocks, row chunks", 4, 40, 20, 23, 40, 3, 3, dict(groups=40, padding=1)),
    (
        "depthwise: 5x5 stride 2 dilated",
        3,
        33,
        12,
        11,
        33,
        5,
        5,
        dict(groups=33, stride=2, dilation=2, padding=(3, 1)),
    ),
    ("depthwise: 1x1 maps", 5, 17, 1, 1, 17, 3, 3, dict(groups=17, padding=1)),
    # a large map and too few (image, channel block) items: the plane loops
    ("depthwise: large map, one image", 1, 12, 20, 20, 12, 3, 3, dict(groups=12, padding=1)),
    ("C=1 first layer", 4, 1, 28, 28, 16, 3, 3, dict()),
    ("batch of 1", 1, 7, 12, 12, 9, 3, 3, dict(padding=1)),
    ("kernel as large as input", 2, 3, 5, 6, 4, 5, 6, dict()),
    ("same, even kernel", 2, 4, 9, 10, 5, 4, 2, dict(padding="same")),
    ("same, dilated", 2, 4, 9, 10, 5, 3, 3, dict(padding="same", dilation=(2, 3))),
    ("valid string", 2, 4, 9, 10, 5, 3, 3, dict(padding="valid")),
    ("primes", 3, 7, 17, 13, 11, 3, 5, dict(padding=(2, 1), stride=(1, 2))),
    ("chunked im2col", 2, 32, 34, 33, 20, 3, 3, dict(padding=1)),
    ("empty batch", 0, 4, 8, 8, 6, 3, 3, dict(padding=1)),
    ("padding larger than kernel", 2, 3, 4, 4, 2, 2, 2, dict(padding=3)),
    # 16+ input channels per group: the data gradient runs as a transposed forward convolution
    ("wide: same, dilated, even", 2, 16, 9, 10, 8, 4, 3, dict(padding="same", dilation=(1, 2))),
    ("wide: groups 2", 2, 32, 8, 8, 12, 3, 3, dict(groups=2, padding=1)),
    ("wide: padding larger than kernel", 2, 16, 4, 5, 4, 2, 2, dict(padding=3)),
    ("wide: 1x1", 2, 24, 6, 7, 10, 1, 1, dict()),
    # maps of < 256 output pixels: every image's pixels are the GEMMs' columns (merged)
    ("merged: groups, stride 2", 13, 4, 6, 7, 6, 3, 3, dict(groups=2, stride=2, padding=1)),
    ("merged: 8x8, no padding", 9, 5, 8, 8, 7, 3, 3, dict()),
    ("merged: 2x2 maps", 5, 20, 2, 2, 9, 3, 3, dict(padding=1)),
    ("merged: 1x1 maps", 3, 17, 1, 1, 6, 3, 3, dict(padding=1)),
    # 16+ channels, stride 1 and K <= N*PQ: the data gradient is the transposed forward, merged
    ("merged: wide, transposed data gradient", 6, 16, 7, 7, 8, 3, 3, dict(padding=1)),
    ("merged: 1x1 stride 2", 4, 18, 8, 8, 10, 1, 1, dict(stride=2)),
    # 20 stride phases: the forward gathers im2col through the tap table (no padded copies),
    # its one-image offsets moved image by image
    (
        "merged: stride (5, 4), dilated, table gather",
        6,
        3,
        11,
        13,
        5,
        3,
        3,
        dict(stride=(5, 4), padding=1, dilation=2),
    ),
    # 41 x 81 = 3321 columns: forward chunks of 2048 end inside an image
    ("merged: chunks split images", 41, 3, 9, 9, 5, 3, 3, dict(padding=1)),
    # CRS = 1440: the weight gradient's chunks of 1456 pixels (7 x 225 = 1575 columns)
    ("merged: weight-gradient chunks", 7, 160, 15, 15, 4, 3, 3, dict(padding=1)),
    # small maps, <= 64 output channels per group, 64+ products per output (C/groups * R * S):
    # output pixels are the GEMM's rows, read in place from a padded channels-last copy of x
    # (pixel rows; also the weight gradient, and the data gradient as the transposed forward)
    (
        "pixel rows: stride 2, dilation 2",
        5,
        24,
        11,
        12,
        40,
        3,
        3,
        dict(stride=2, dilation=2, padding=2),
    ),
    ("pixel rows: chunks split images", 37, 16, 9, 9, 64, 3, 3, dict(padding=1)),
    ("pixel rows: groups 3, 5x3", 4, 48, 7, 9, 33, 5, 3, dict(groups=3, padding=(1, 2))),
    ("pixel rows: 1x1 maps, batch 1", 1, 20, 1, 1, 7, 3, 3, dict(padding=1)),
    ("pixel rows: 1x1 conv", 6, 96, 5, 6, 24, 1, 1, dict()),
    # >= 256 output pixels: pixel rows only with <= 32 output channels and a spatial kernel
    ("pixel rows: large map, stride 2", 2, 12, 35, 33, 20, 3, 3, dict(stride=2, padding=1)),
    # strided: up to 64 output channels on large maps (a 7x7 stride-2 stem), CRS from 24 on
    ("pixel rows: strided stem", 2, 3, 37, 35, 48, 7, 7, dict(stride=2, padding=3)),
    ("pixel rows: strided, CRS 27", 3, 3, 33, 34, 20, 3, 3, dict(stride=2, padding=1)),
    ("pixel rows: 4x4 dilated", 3, 64, 6, 7, 17, 4, 4, dict(padding=3, dilation=(1, 2))),
    # 66 x 66 = 4356 pixels per image, chunks of 4096: one image per block, two chunks
    ("pixel rows: chunks inside an image", 4, 16, 66, 66, 32, 3, 3, dict(padding=1)),
    # padding 3 > R - 1: the data gradient's transposed forward crops its input
    ("pixel rows: cropping pad", 3, 32, 5, 6, 24, 2, 2, dict(padding=3)),
    # 3x3 stride 1, 64+ channels each way, 64+ 2x2 output tiles: Winograd F(2x2, 3x3) (forward,
    # and the data gradient as the transposed forward)
    ("winograd: odd map, pad 1", 3, 64, 13, 11, 64, 3, 3, dict(padding=1)),
    ("winograd: no padding", 2, 72, 19, 20, 65, 3, 3, dict()),
    ("winograd: asymmetric pad, groups", 2, 128, 16, 15, 128, 3, 3, dict(padding=(2, 0), groups=2)),
    ("winograd: tile chunks", 2, 256, 24, 24, 256, 3, 3, dict(padding=1)),
    # 64+ channels but 32 tiles (< 64): the direct GEMMs
    ("winograd: too few tiles, direct", 2, 64, 7, 7, 64, 3, 3, dict(padding=1)),
    # 32 - 63 channels: the weight gradient only
    ("winograd: weight gradient only", 5, 40, 9, 10, 32, 3, 3, dict(padding=1)),
    # maps of >= 256 output pixels: one image at a time (or images side by side on the threads)
    ("per-image: 3x3 16x16", 3, 5, 16, 16, 7, 3, 3, dict(padding=1)),
    ("per-image: stride 2", 2, 6, 33, 34, 7, 3, 3, dict(stride=2, padding=1)),
    # strided, more than 64 output channels: im2col from the stride's phase planes; past 16 phases
    # (stride 5 x 4) gathered with bounds checks
    ("per-image: stride 2, phase planes", 2, 8, 33, 32, 72, 3, 3, dict(stride=2, padding=1)),
    (
        "per-image: stride (3, 2), dilation 2, phase planes",
        1,
        5,
        44,
        37,
        70,
        3,
        3,
        dict(stride=(3, 2), dilation=2, padding=(2, 1)),
    ),
    ("per-image: stride 5x4, gathered", 1, 3, 90, 70, 66, 5, 4, dict(stride=(5, 4), padding=2)),
    ("per-image: wide, transposed data gradient", 2, 16, 17, 16, 8, 3, 3, dict(padding=1)),
    ("per-image: 1x1", 2, 24, 16, 17, 10, 1, 1, dict()),
    # pointwise on 128 - 255 pixels: per image with x in place (not merged, not pixel rows)
    ("per-image: pointwise 12x13", 3, 96, 12, 13, 24, 1, 1, dict()),
    ("per-image: pointwise 12x13, wide out", 2, 16, 13, 12, 100, 1, 1, dict()),
    ("per-image: groups 2", 2, 32, 16, 16, 12, 3, 3, dict(groups=2, padding=1)),
]
FAST = [
    "3x3 pad1",
    "merged: groups, stride 2",
    "merged: 2x2 maps",
    "per-image: 3x3 16x16",
    "winograd: odd map, pad 1",
    "1x1 pointwise",
    "depthwise",
    "depthwise: channel blocks, row chunks",
    "depthwise: 5x5 stride 2 dilated",
    "chunked im2col",
    "same, even kernel",
    "C=1 first layer",
    "pixel rows: stride 2, dilation 2",
    "pixel rows: groups 3, 5x3",
]


def _check_conv(x, w, b, kwargs, *, dx=True):
    def leaves(cast, copy):
        out = []
        for i, t in enumerate((x, w, b)):
            if t is None:
                out.append(None)
                continue
            t = cast(t.detach())
            if copy:
                t = t.clone(memory_format=torch.preserve_format)
            out.append(t.requires_grad_(dx or i > 0))
        return out

    ours_in = leaves(lambda t: t, False)
    torch_in = leaves(lambda t: t, True)
    ref_in = leaves(lambda t: t.double(), True)
    ours = NF.conv2d(*ours_in, **kwargs)
    theirs = F.conv2d(*torch_in, **kwargs)
    ref = F.conv2d(*ref_in, **kwargs)
    k_, cg, r, s = w.shape
    assert_matches_reference(ours, theirs, ref, k=cg * r * s + 1, name="out")
    assert ours.is_contiguous(memory_format=torch.channels_last) == theirs.is_contiguous(
        memory_format=torch.channels_last
    ), "output memory format differs from torch's"
    if ref.numel() == 0:
        return
    g = torch.randn_like(ref)
    want = [i for i, t in enumerate(ours_in) if t is not None and t.requires_grad]
    gs = torch.autograd.grad(ours, [ours_in[i] for i in want], g.to(ours.dtype))
    gs_t = torch.autograd.grad(theirs, [torch_in[i] for i in want], g.to(theirs.dtype))
    gs_r = torch.autograd.grad(ref, [ref_in[i] for i in want], g)
    groups = kwargs.get("groups", 1)
    reduce = {
        0: k_ // groups * r * s,
        1: ref.shape[0] * ref.shape[2] * ref.shape[3],
        2: ref.numel() // k_,
    }
    for i, a, t_, rr in zip(want, gs, gs_t, gs_r):
        assert_matches_reference(
            a, t_, rr, k=reduce[i], name=("grad input", "grad weight", "grad bias")[i]
        )


def _inputs(N, C, H, W, K, R, S, groups, dtype=torch.float32, bias=True):
    x = torch.randn(N, C, H, W, dtype=dtype)
    w = torch.randn(K, C // groups, R, S, dtype=dtype) / (C // groups * R * S) ** 0.5
    b = torch.randn(K, dtype=dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv2d(case, dtype):
    _, N, C, H, W, K, R, S, kw = case
    _check_conv(*_inputs(N, C, H, W, K, R, S, kw.get("groups", 1), dtype), kw)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in FAST], ids=FAST)
def test_conv2d_every_isa(isa, case):
    _, N, C, H, W, K, R, S, kw = case
    _check_conv(*_inputs(N, C, H, W, K, R, S, kw.get("groups", 1)), kw)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("N", [1, 2, 3, 6, 9])
@pytest.mark.parametrize("H", [10, 17], ids=["merged", "per-image"])
def test_conv2d_threads(threads, N, H):
    """Small maps: merged columns with threaded GEMMs; larger ones one image at a time with
    threaded GEMMs, or images side by side with per-thread partials."""
    _check_conv(*_inputs(N, 6, H, 16, 8, 3, 3, 1), dict(padding=1))


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("N", [1, 3, 9, 37])
def test_conv2d_pixel_rows_blocks(threads, N):
    """Pixel rows in blocks of whole images (8 of 8x8 at most): each thread its own blocks and
    weight-gradient partial when there are images to spare, a short last block, or one block of
    every image with threaded steps."""
    _check_conv(*_inputs(N, 16, 8, 8, 24, 3, 3, 1), dict(padding=1))


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("N", [2, 7])
def test_conv2d_winograd_row_blocks(threads, N):
    """Winograd forward (and the data gradient, its transposed forward) with 64 -> 64 channels on
    30x30 (15 tiles a row): one tile-row block per thread at a time (8 rows a block, V and M in the
    thread's own buffers, a short last block) when there are 4 blocks per thread or more (N = 7 on
    3 threads, 105 rows), else chunks shared by all threads (N = 2, one thread)."""
    _check_conv(*_inputs(N, 64, 30, 30, 64, 3, 3, 1), dict(padding=1))


def test_conv2d_no_bias_and_frozen_parts():
    x, w, _ = _inputs(3, 4, 8, 8, 6, 3, 3, 1)
    _check_conv(x, w, None, dict(padding=1))
    _check_conv(
        x, w, torch.randn(6), dict(padding=1), dx=False
    )  # input needs no grad (first layer)
    # only the bias needs a gradient
    b = torch.randn(6, requires_grad=True)
    NF.conv2d(x, w, b, padding=1).sum().backward()
    torch.testing.assert_close(b.grad, torch.full((6,), 64.0 * 3))


@pytest.mark.parametrize("which", ["input", "weight", "both"])
def test_conv2d_channels_last(which):
    x, w, b = _inputs(2, 8, 9, 10, 12, 3, 3, 1)
    cl = torch.channels_last
    if which in ("input", "both"):
        x = x.to(memory_format=cl)
    if which in ("weight", "both"):
        w = w.to(memory_format=cl)
    _check_conv(x, w, b, dict(padding=1, stride=(1, 2)))
    _check_conv(x, w, b, dict())
    wd = torch.randn(16, 1, 3, 3)  # depthwise x2 on channels_last
    _check_conv(
        x,
        wd.to(memory_format=cl) if which != "input" else wd,
        b.repeat(2)[:16],
        dict(groups=8, padding=1),
    )


def test_conv2d_pixel_rows_layouts():
    """The pixel-rows and channels-last depthwise paths copy x to channels-last from any layout
    and write y (and read dy) in any layout: channels_last tensors, views with no unit stride, a
    dy that is not (H, W)-flattenable."""
    x, w, b = _inputs(3, 24, 7, 9, 20, 3, 3, 1)
    _check_conv(x.to(memory_format=torch.channels_last), w, b, dict(padding=1))
    _check_conv(x, w.to(memory_format=torch.channels_last), b, dict(padding=1, stride=(1, 2)))
    xs = torch.randn(3, 48, 7, 18)[:, ::2, :, ::2]  # (3, 24, 7, 9), no unit stride anywhere
    _check_conv(xs, w.transpose(2, 3), b, dict(padding=1))
    xx = x.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    NF.conv2d(xx, ww, padding=1).transpose(2, 3).contiguous().sum().backward()
    xt, wt_ = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.conv2d(xt, wt_, padding=1).transpose(2, 3).contiguous().sum().backward()
    torch.testing.assert_close(xx.grad, xt.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ww.grad, wt_.grad, rtol=1e-4, atol=1e-4)
    # the channels-last depthwise path from and to the same layouts
    wd = torch.randn(24, 1, 3, 3)
    _check_conv(x.to(memory_format=torch.channels_last), wd, b[:20].repeat(2)[:24], dict(groups=24))
    _check_conv(xs, wd.transpose(2, 3), None, dict(groups=24, padding=1, stride=2))


def test_conv2d_strided_views():
    x = torch.randn(3, 10, 12, 20)[:, ::2, :, ::2]  # (3, 5, 12, 10), no unit stride anywhere
    w = torch.randn(6, 5, 3, 3).transpose(2, 3)  # non-contiguous weight
    _check_conv(x, w, torch.randn(6), dict(padding=1))
    # a gradient that is not (H, W)-flattenable reaches the backward kernels
    xx = torch.randn(2, 4, 9, 9, requires_grad=True)
    ww = torch.randn(5, 4, 3, 3, requires_grad=True)
    y = NF.conv2d(xx, ww, padding=1)
    y.transpose(2, 3).contiguous().sum().backward()
    y_t = F.conv2d(xx.detach(), ww.detach(), padding=1)
    assert y.shape == y_t.shape and ww.grad.shape == ww.shape


def test_conv2d_unbatched():
    x = torch.randn(4, 9, 9)
    w = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(
        NF.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1), rtol=1e-5, atol=1e-5
    )


def test_conv2d_gradcheck():
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for kw in (
        dict(groups=2, padding=1, stride=(2, 1)),
        dict(groups=2, padding="same", dilation=2),
    ):
        fn = lambda a, c, d, kw=kw: NF.conv2d(a, c, d, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))
    # one image at a time (a 16x16 output map), both directions of the data gradient
    xl = torch.randn(2, 2, 16, 17, dtype=torch.float64, requires_grad=True)
    wl = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    for kw in (dict(padding=1), dict(padding=(1, 2), stride=(1, 1))):
        assert torch.autograd.gradcheck(lambda a, c, kw=kw: NF.conv2d(a, c, **kw), (xl, wl))
    xs = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(4, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, c: NF.conv2d(a, c), (xs, ws))  # pointwise
    # depthwise (direct loops), with a channel multiplier and a stride
    xd = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(6, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    bd = torch.randn(6, dtype=torch.float64, requires_grad=True)
    fn = lambda a, c, d: NF.conv2d(a, c, d, groups=3, stride=(2, 1), padding=1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (xd, wd, bd))
    assert torch.autograd.gradgradcheck(fn, (xd, wd, bd))


# ------------------------------------------------------------------------------------ nn.Conv2d


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, (2, 1), "same"])
def test_module_matches_torch(padding_mode, padding):
    torch.manual_seed(3)
    kw = dict(padding=padding, padding_mode=padding_mode, bias=True)
    ref = torch.nn.Conv2d(4, 6, (3, 4) if padding == "same" else 3, **kw)
    ours = nnkernels.nn.Conv2d(4, 6, (3, 4) if padding == "same" else 3, **kw)
    assert isinstance(ours, torch.nn.Conv2d)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 9, 10, requires_grad=True)
    x_t = x.detach().clone().requires_grad_()
    y, y_t = ours(x), ref(x_t)
    assert_matches_reference(y, y_t, copy.deepcopy(ref).double()(x.detach().double()), k=49)
    g = torch.randn_like(y)
    y.backward(g)
    y_t.backward(g)
    torch.testing.assert_close(x.grad, x_t.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)


def test_module_constructor_arguments():
    m = nnkernels.nn.Conv2d(
        6,
        4,
        kernel_size=(3, 1),
        stride=2,
        padding=(1, 0),
        dilation=2,
        groups=2,
        bias=False,
        padding_mode="replicate",
        dtype=torch.float64,
    )
    ref = torch.nn.Conv2d(6, 4, (3, 1), 2, (1, 0), 2, 2, False, "replicate", dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    assert m.bias is None and m.weight.dtype == torch.float64
    assert repr(m).split("(", 1)[1] == repr(ref).split("(", 1)[1]
    x = torch.randn(2, 6, 11, 7, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x))


def test_course_cnn_trains_like_torch():
    """The course CNN's conv layers; five SGD steps give the same parameters."""
    torch.manual_seed(4)

    def net(conv):
        return torch.nn.Sequential(
            conv(1, 8, 3),
            torch.nn.ReLU(),
            conv(8, 4, 3, padding=1, padding_mode="reflect"),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * 10 * 10, 10),
        )

    ref, ours = net(torch.nn.Conv2d), net(nnkernels.nn.Conv2d)
    ours.load_state_dict(ref.state_dict())
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.05)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.05)
    x, y = torch.randn(16, 1, 12, 12), torch.randint(0, 10, (16,))
    for _ in range(5):
        for model, opt in ((ref, opt_r), (ours, opt_o)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for (n, p_r), p_o in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_o, p_r, rtol=1e-4, atol=1e-5, msg=n)


# ------------------------------------------------------------------------------------ bad input


def _raises(exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        NF.conv2d(*args, **kwargs)


def test_conv2d_bad_input():
    x, w = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    _raises(
        ValueError,
        r"weight \(6, 4, 3, 3\) expects 4 input channels .* has 5",
        torch.randn(2, 5, 8, 8),
        w,
    )
    _raises(ValueError, "groups=3 must divide", x, torch.randn(6, 1, 3, 3), groups=3)
    _raises(ValueError, "groups=4 must divide", x, torch.randn(6, 1, 3, 3), groups=4)
    _raises(ValueError, "expects 8 input channels", x, torch.randn(6, 4, 3, 3), groups=2)
    _raises(ValueError, "kernel .* larger than the padded input", x, torch.randn(6, 4, 9, 3))
    _raises(ValueError, "kernel .* larger than the padded input", x, w, dilation=4)
    _raises(ValueError, "input must be 4-D .* or 3-D", torch.randn(8, 8), w)
    _raises(ValueError, "input must be 4-D .* or 3-D", torch.randn(1, 2, 4, 8, 8), w)
    _raises(ValueError, "weight must be 4-D", x, torch.randn(6, 4, 3))
    _raises(ValueError, "stride must be positive", x, w, stride=0)
    _raises(ValueError, "stride must be positive", x, w, stride=(1, -1))
    _raises(ValueError, "dilation must be positive", x, w, dilation=0)
    _raises(ValueError, "padding must be non-negative", x, w, padding=-1)
    _raises(TypeError, "stride must be an int or a tuple of 2 ints", x, w, stride=(1, 2, 3))
    _raises(TypeError, "stride must be an int or a tuple of 2 ints", x, w, stride=1.5)
    _raises(ValueError, "padding must be 'valid', 'same'", x, w, padding="full")
    _raises(ValueError, "'same' is not supported for strided", x, w, padding="same", stride=2)
    _raises(ValueError, "groups must be a positive int", x, w, groups=0)
    _raises(ValueError, "groups must be a positive int", x, w, groups=True)
    _raises(ValueError, r"bias must have shape \(6,\)", x, w, torch.randn(4))
    _raises(TypeError, "weight has dtype float64", x, w.double())
    _raises(TypeError, "input must be a floating-point tensor", x.long(), w)
    assert NF.conv2d(x.half(), w.half()).dtype == torch.float16  # float32 math (test_low_precision)
    _raises(ValueError, "weight is on meta", x, w.to("meta"))


def test_native_conv_rejects_bad_calls():
    """The binding validates on its own (what nnkernels.kernels users and future callers hit)."""
    from nnkernels import _C
    from torch.utils.dlpack import to_dlpack as D

    x, w = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    y = torch.empty(2, 6, 6, 6)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 6, 8, 8\)"):
        _C.conv2d_forward(D(x), D(w), None, D(y), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    with pytest.raises(ValueError, match="stride must be positive"):
        _C.conv2d_forward(D(x), D(w), None, D(y), (0, 1), (0, 0, 0, 0), (1, 1), 1)
    with pytest.raises(ValueError, match="out must not share memory with input"):
        _C.conv2d_forward(
            D(x), D(torch.randn(4, 4, 1, 1)), None, D(x), (1, 1), (0, 0, 0, 0), (1, 1), 1
        )
    with pytest.raises(
        ValueError, match=r"weight must have its \(C/groups, R, S\) dims contiguous"
    ):
        _C.conv2d_forward(D(x), D(w.transpose(2, 3)), None, D(y), (1, 1), (0, 0, 0, 0), (1, 1), 1)


def test_size_one_spatial_dims_with_any_stride():
    """A size-1 H or W may carry any stride (x.transpose(2, 3) of a (N, C, 1, W) tensor): weight,
    input and gradient in that form give torch's results (they once read W's stride as the pixel
    stride: garbage outputs)."""
    torch.manual_seed(4)
    w = torch.randn(4, 3, 1, 5).transpose(2, 3)  # (4, 3, 5, 1), strides (15, 5, 1, 5)
    x = torch.randn(2, 3, 9, 6)
    torch.testing.assert_close(NF.conv2d(x, w), F.conv2d(x, w))
    xs = torch.randn(2, 6, 1, 9).transpose(2, 3)  # (2, 6, 9, 1)
    w2, b = torch.randn(4, 6, 3, 1), torch.randn(4)
    g = torch.randn(2, 4, 1, 7).transpose(2, 3)  # (2, 4, 7, 1)
    outs = []
    for fn in (NF.conv2d, F.conv2d):
        leaves = [t.clone().requires_grad_() for t in (xs, w2, b)]
        y = fn(*leaves)
        outs.append((y, *torch.autograd.grad(y, leaves, g)))
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r)


def test_input_whose_pixels_do_not_flatten():
    """A strided view of the input (every other row and column): copied for the kernels, not
    refused (torch accepts it)."""
    x = torch.randn(2, 6, 18, 10, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    view = x[:, ::2, ::2, ::2]
    ours = NF.conv2d(view, w, padding=1)
    theirs = F.conv2d(view, w, padding=1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(theirs)
    for a, b in zip(torch.autograd.grad(ours, [x, w], g), torch.autograd.grad(theirs, [x, w], g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
