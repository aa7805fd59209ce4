"""Shared test machinery: the reference rule of DESIGN.md section 4, ISA and thread fixtures."""

import math

import nnkernels
import pytest
import torch
from nnkernels import _C

ISAS = nnkernels.available_isas()
# Where AVX-512 is missing but AVX2 is there, also run the AVX2 kernels at the AVX-512 kernels'
# tile and block sizes (14x32 / 14x16): every driver path the AVX-512 build takes gets tested.
if "avx2" in ISAS and "avx512" not in ISAS:
    ISAS = [*ISAS, "avx2-as-avx512-tiles"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test once per CPU path this machine has (avx512 / avx2 / scalar)."""
    before = _C.isa()
    emulate = request.param == "avx2-as-avx512-tiles"
    _C.set_isa("avx2" if emulate else request.param)
    _C._emulate_avx512_tiles(emulate)
    yield request.param
    _C._emulate_avx512_tiles(False)
    _C.set_isa(before)


@pytest.fixture
def threads(request):
    """Runs with nnkernels.set_num_threads(request.param), then back to following torch."""
    n = request.param
    nnkernels.set_num_threads(n)
    yield n
    import nnkernels._ops as ops

    ops._user_threads = None
    ops.sync_threads()


def assert_matches_reference(ours, theirs, ref, *, k=1, scale=None, name="output", mult=8.0):
    """The reference rule: compare ours and torch's result (same dtype) against a float64 reference
    computed by torch from the same inputs. ours must be within `mult` x torch's own error, plus an
    absolute term c * sqrt(k) * eps * scale for reductions of length k (scale: the magnitude of the
    summands, default max |ref|). float64 results must be within 1e-9 relative of the reference.
    """
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != torch's {theirs.dtype}"
    if ref.numel() == 0:
        return
    ours64, theirs64, ref64 = ours.double().cpu(), theirs.double().cpu(), ref.double().cpu()
    assert torch.isfinite(ours64).all() == torch.isfinite(ref64).all(), f"{name}: non-finite values"
    err = (ours64 - ref64).abs().max().item()
    torch_err = (theirs64 - ref64).abs().max().item()
    if scale is None:
        scale = ref64.abs().max().item()
    scale = max(float(scale), 1e-30)
    if ours.dtype == torch.float64:
        assert err <= 1e-9 * scale, f"{name}: float64 error {err:.3e} > 1e-9 x {scale:.3e}"
        return
    eps = torch.finfo(ours.dtype).eps
    atol = 2.0 * math.sqrt(max(k, 1)) * eps * scale
    assert err <= mult * torch_err + atol, (
        f"{name}: error {err:.3e} vs torch's {torch_err:.3e} (allowed {mult} x torch + {atol:.3e})"
    )


def ref_and_torch(fn, *tensors):
    """(torch's result on the inputs as given, torch's float64 result on the same values)."""
    theirs = fn(*tensors)
    ref = fn(*[t.double() if isinstance(t, torch.Tensor) else t for t in tensors])
    return theirs, ref
