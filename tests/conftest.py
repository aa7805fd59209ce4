"""Shared test machinery: the reference rule of DESIGN.md section 4, ISA and thread fixtures."""

import nnkernels
import pytest
import torch
from nnkernels import _native
from nnkernels.check import reference_error

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
    """Runs the test once per CPU path this machine has (avx512 / avx2 / baseline)."""
    before = _native.isa()
    emulate = request.param == "avx2-as-avx512-tiles"
    _native.set_isa("avx2" if emulate else request.param)
    _native.emulate_avx512_tiles(emulate)
    yield request.param
    _native.emulate_avx512_tiles(False)
    _native.set_isa(before)


BF16_KERNELS = ["bf16gemm_amx_32x32", "bf16gemm_avx512bf16_8x32", "bf16gemm_widen_f32"]


def _bf16_cases():
    """(ISA, kernel) pairs: each bfloat16 kernel the CPU has on the AVX-512 path, and the widening
    kernel on every other path (the one an AVX2-only machine runs)."""
    out = []
    for isa in ISAS:
        if isa == "avx512":
            _native.set_isa("avx512")
            for k in BF16_KERNELS:
                try:
                    _native.set_gemm_bf16_kernel(k)
                except ValueError:
                    continue
                out.append((isa, k))
            _native.set_gemm_bf16_kernel("")
        elif isa in ("avx2", "baseline"):
            out.append((isa, "bf16gemm_widen_f32"))
    return out


BF16_CASES = _bf16_cases()


@pytest.fixture(params=BF16_CASES, ids=[f"{i}-{k.split('_')[1]}" for i, k in BF16_CASES])
def bf16_kernel(request):
    """Runs the test once per (ISA, bfloat16 GEMM kernel) this machine has."""
    isa, name = request.param
    before = _native.isa()
    _native.set_isa(isa)
    _native.set_gemm_bf16_kernel(name)
    assert _native.gemm_bf16_kernel_name() == name
    yield name
    _native.set_gemm_bf16_kernel("")
    _native.set_isa(before)


@pytest.fixture
def stream_stores():
    """Outputs of 64 KiB and more written with non-temporal stores (by default only those larger
    than the last-level cache are, which tests would rarely reach), then back to the default."""
    _native.set_stream_min_bytes(64 << 10)
    yield
    _native.set_stream_min_bytes(0)


@pytest.fixture
def threads(request):
    """Runs with nnkernels.set_num_threads(request.param), then back to following torch."""
    n = request.param
    nnkernels.set_num_threads(n)
    yield n
    _native.follow_torch_threads()


def assert_matches_reference(ours, theirs, ref, *, k=1, scale=None, name="output", mult=8.0):
    """The reference rule (nnkernels.check.reference_error, the same rule `python -m nnkernels
    check` applies): ours and torch's result (same dtype) against a float64 reference computed by
    torch from the same inputs. ours must be within `mult` x torch's own error, plus an absolute
    term 2 sqrt(k) eps scale for reductions of length k (scale: the magnitude of the summands,
    default max |ref|). float64 results must be within 1e-9 relative of the reference.
    """
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != torch's {theirs.dtype}"
    err, torch_err, allowed, ok = reference_error(ours, theirs, ref, k=k, scale=scale, mult=mult)
    assert ok, (
        f"{name}: error {err:.3e} vs torch's {torch_err:.3e} (allowed {allowed:.3e}; non-finite "
        "values must sit where the reference has them)"
    )


def ref_and_torch(fn, *tensors):
    """(torch's result on the inputs as given, torch's float64 result on the same values)."""
    theirs = fn(*tensors)
    ref = fn(*[t.double() if isinstance(t, torch.Tensor) else t for t in tensors])
    return theirs, ref


def free_port() -> int:
    """A free TCP port on localhost (for gloo process groups in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
