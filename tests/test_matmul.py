"""nnkernels.functional.matmul against torch.matmul: forward and both gradients, every ISA path,
tile and block edges, strides, batching and broadcasting, gradcheck."""

import os
import subprocess
import sys

import nnkernels.functional as NF
import pytest
import torch
from conftest import assert_matches_reference

# (M, N, K) around the register tiles (AVX2 6x16, AVX-512 14x32, portable 6x8 / 6x4), primes,
# size 1, zero, and past the cache blocks (kc: float 1024, double 512, baseline 256; mc 144/336 or
# fewer on a small L2; nc 4080/4096).
SHAPES = [
    (1, 1, 1),
    (1, 17, 7),
    (6, 16, 8),
    (5, 15, 9),
    (7, 17, 129),
    (13, 31, 33),
    (14, 32, 64),
    (15, 33, 65),
    (29, 64, 257),
    (100, 300, 784),
    (145, 97, 1000),
    (337, 130, 385),
    (0, 5, 3),
    (4, 0, 3),
    (4, 5, 0),
]
# Past the cache blocks: two N blocks; several M blocks; several K blocks (K = 2100: three of 700
# in float, five of 420 in double) with B packed for all of K at once; B packed per K block (K x N
# too large to pack whole); B read in place (M of two tiles) in K blocks.
BIG = [(70, 4100, 300), (700, 40, 520), (40, 300, 2100), (50, 1400, 2500), (20, 1400, 800)]


def _check_mm(a, b, k):
    a = a.detach().requires_grad_()
    b = b.detach().requires_grad_()
    a_t = a.detach().clone().requires_grad_()
    b_t = b.detach().clone().requires_grad_()
    a64 = a.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()

    ours = NF.matmul(a, b)
    theirs = torch.matmul(a_t, b_t)
    ref = torch.matmul(a64, b64)
    assert_matches_reference(ours, theirs, ref, k=k, name="out")

    if ours.numel() == 0 and a.numel() == 0 and b.numel() == 0:
        return
    g = torch.randn_like(ref)
    da, db = torch.autograd.grad(ours, (a, b), g.to(ours.dtype))
    da_t, db_t = torch.autograd.grad(theirs, (a_t, b_t), g.to(theirs.dtype))
    da_r, db_r = torch.autograd.grad(ref, (a64, b64), g)
    n = ours.shape[-1] if ours.dim() else 1
    m = ours.shape[-2] if ours.dim() >= 2 else 1
    assert_matches_reference(da, da_t, da_r, k=n, name="grad a")
    assert_matches_reference(
        db, db_t, db_r, k=m * max(1, ours.numel() // max(1, m * n)), name="grad b"
    )


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matmul_2d(isa, M, N, K, dtype):
    _check_mm(torch.randn(M, K, dtype=dtype), torch.randn(K, N, dtype=dtype), K)


@pytest.mark.parametrize("M,N,K", BIG)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matmul_past_cache_blocks(isa, M, N, K, dtype):
    _check_mm(torch.randn(M, K, dtype=dtype), torch.randn(K, N, dtype=dtype), K)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize(
    "M,N,K",
    [(1, 500, 64), (3, 7, 5), (200, 9, 300), (61, 67, 71), (512, 512, 64), (20, 800, 200)]
    + [(100, 128, 128), (30, 784, 300)],
)
def test_matmul_thread_grids(threads, M, N, K):
    """Row split (even shares of rows, not whole tiles: 20 rows as 10 + 10, 100 as 50 + 50 or
    34 + 33 + 33), column split (M tiny) and more threads than cores all give the same result."""
    _check_mm(torch.randn(M, K), torch.randn(K, N), K)


# Skinny paths: A read in place when N is a few panels (rows contiguous, or columns contiguous
# with k steps at most 2 KiB apart: "ta" at M = 100 in place, at M = 1000 packed; neither: packed);
# B read in place when M is a tile or two and B is row-major; C^T = B^T
# A^T when M is small and B is a transposed row-major matrix. Edge rows/columns included.
SKINNY = [
    (100, 10, 300),
    (97, 17, 129),
    (6, 64, 50),
    (1000, 64, 33),
    (1, 300, 200),
    (5, 100, 64),
    (12, 129, 40),
    (13, 129, 40),
    (64, 1000, 70),
    (65, 1000, 70),
    (7, 4100, 20),
    # N <= 4 with A's rows and B's columns contiguous ("tb"): dot products; other layouts tiles
    (9, 1, 64),
    (13, 3, 100),
    (6, 4, 257),
]


@pytest.mark.parametrize("M,N,K", SKINNY)
@pytest.mark.parametrize("layout", ["rowmajor", "ta", "tb", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matmul_skinny(isa, M, N, K, layout, dtype):
    if layout == "ta":
        a = torch.randn(K, M, dtype=dtype).mT
    elif layout == "sliced":
        a = torch.randn(M, 2 * K, dtype=dtype)[:, ::2]
    else:
        a = torch.randn(M, K, dtype=dtype)
    b = torch.randn(N, K, dtype=dtype).mT if layout == "tb" else torch.randn(K, N, dtype=dtype)
    _check_mm(a, b, K)


# Packed B at few rows per thread: each row share packs its own copy of the panels it reads and no
# barrier is left (own_b), on 2 x 1, 1 x 2, 3 x 1 and 2 x 2 grids: B = W^T (packed, never read in
# place), an edge panel, K past a cache block packed block by block (not all of K at once), and
# rows past the 512-per-thread limit (shared B again).
@pytest.mark.parametrize("threads", [1, 2, 3, 4], indirect=True)
@pytest.mark.parametrize(
    "M,N,K", [(64, 100, 300), (128, 96, 300), (29, 200, 70), (600, 400, 3000), (1100, 70, 90)]
)
def test_matmul_own_b_panels(isa, threads, M, N, K):
    _check_mm(torch.randn(M, K), torch.randn(N, K).mT, K)


def test_matmul_short_omp_team():
    """A team shorter than planned (OMP_THREAD_LIMIT=1 under set_num_threads(2)): thread 0 runs
    the whole plan alone, packing every B panel, for own-B, shared-B and whole-K plans."""
    code = """
import torch, nnkernels, nnkernels.functional as NF
nnkernels.set_num_threads(2)
for M, N, K in [(29, 512, 300), (29, 512, 3000), (64, 100, 300), (600, 400, 3000), (128, 96, 300)]:
    a, w = torch.randn(M, K, dtype=torch.float64), torch.randn(N, K, dtype=torch.float64)
    err = (NF.matmul(a.float(), w.float().mT).double() - a @ w.mT).abs().max().item()
    assert err < 1e-2 * K ** 0.5, (M, N, K, err)
print("ok")
"""
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


# A row-major B that fits L2, with rows at most 4 KiB apart, is read in place at any M (no pack, no
# barrier): whole rows, a column slice of a wider matrix (rows further apart than N), an edge panel
# of N, K past a cache block; rows 4400 bytes apart are packed again.
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize(
    "M,N,K,row",
    [
        (128, 128, 128, 128),
        (100, 45, 70, 90),
        (64, 784, 300, 784),
        (31, 100, 1100, 101),
        (50, 50, 60, 1100),
        (64, 98, 3000, 98),  # past kInPlaceMaxB: packed again
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matmul_small_b_in_place(isa, threads, M, N, K, row, dtype):
    b = torch.randn(K, row, dtype=dtype)[:, :N]
    _check_mm(torch.randn(M, K, dtype=dtype), b, K)


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matmul_transposed(isa, ta, tb, dtype):
    M, N, K = 37, 45, 131
    a = torch.randn(K, M, dtype=dtype).mT if ta else torch.randn(M, K, dtype=dtype)
    b = torch.randn(N, K, dtype=dtype).mT if tb else torch.randn(K, N, dtype=dtype)
    _check_mm(a, b, K)


def test_matmul_sliced(isa):
    """Neither dimension unit-stride: the generic packing paths."""
    a = torch.randn(90, 300)[::3, ::2]  # (30, 150), strides (900, 2)
    b = torch.randn(450, 80)[::3, 1::2]  # (150, 40), strides (240, 2)
    assert not a.is_contiguous() and not b.is_contiguous()
    _check_mm(a, b, 150)


def test_matmul_expanded_operand(isa):
    """A stride-0 operand (an expanded row), as autograd produces for sum().backward()."""
    a = torch.randn(1, 50).expand(33, 50)
    _check_mm(a, torch.randn(50, 21), 50)


@pytest.mark.parametrize(
    "sa,sb",
    [
        ((4, 13, 17), (4, 17, 9)),  # batched
        ((3, 5, 13, 17), (17, 9)),  # folded into one GEMM
        ((13, 17), (4, 17, 9)),  # a broadcast over the batch
        ((2, 1, 13, 17), (3, 17, 9)),  # batch dims broadcast both ways
        ((17,), (17, 9)),  # vector @ matrix
        ((13, 17), (17,)),  # matrix @ vector
        ((17,), (17,)),  # dot
        ((4, 13, 17), (17,)),
        ((0, 13, 17), (0, 17, 9)),  # empty batch
    ],
)
def test_matmul_batched_and_broadcast(isa, sa, sb):
    _check_mm(torch.randn(*sa), torch.randn(*sb), sa[-1])


def test_matmul_batched_many_small(isa):
    """Many small items: the batch runs in parallel, one item per thread."""
    _check_mm(torch.randn(64, 9, 20), torch.randn(64, 20, 7), 20)


def test_matmul_noncontiguous_batch(isa):
    a = torch.randn(13, 4, 17).transpose(0, 1)  # (4, 13, 17), batch stride 17
    b = torch.randn(4, 9, 17).mT  # (4, 17, 9), transposed items
    _check_mm(a, b, 17)


def test_matmul_propagates_nan_and_inf(isa):
    a = torch.randn(8, 20)
    b = torch.randn(20, 18)
    a[2, 3] = float("nan")
    b[4, 5] = float("inf")
    ours, theirs = NF.matmul(a, b), torch.matmul(a, b)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


@pytest.mark.parametrize("shapes", [((5, 7), (7, 3)), ((2, 5, 7), (2, 7, 3)), ((7,), (7, 3))])
def test_matmul_gradcheck(shapes):
    a = torch.randn(*shapes[0], dtype=torch.float64, requires_grad=True)
    b = torch.randn(*shapes[1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(NF.matmul, (a, b))
    assert torch.autograd.gradgradcheck(NF.matmul, (a, b))


def test_matmul_only_needed_grads():
    a = torch.randn(5, 7, requires_grad=True)
    b = torch.randn(7, 3)
    NF.matmul(a, b).sum().backward()
    assert a.grad is not None and b.grad is None
    torch.testing.assert_close(a.grad, torch.ones(5, 3) @ b.mT)
