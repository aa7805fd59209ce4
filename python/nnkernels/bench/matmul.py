"""matmul benchmark cases: nnkernels.functional.matmul vs torch.matmul (forward)."""

import torch

import nnkernels.functional as NF

from .harness import Case, sampler


def _case(M, N, K, device, dtype=torch.float32, ta=False, tb=False, batch=None):
    lead = () if batch is None else (batch,)
    a = (
        torch.randn(*lead, K, M, device=device, dtype=dtype).mT
        if ta
        else torch.randn(*lead, M, K, device=device, dtype=dtype)
    )
    b = (
        torch.randn(*lead, N, K, device=device, dtype=dtype).mT
        if tb
        else torch.randn(*lead, K, N, device=device, dtype=dtype)
    )
    name = f"{M}x{N}x{K}"
    if ta or tb:
        name += " " + ("A^T" if ta else "A") + ("B^T" if tb else "B")
    if batch:
        name = f"{batch}x[{name}]"
    return Case(
        op="matmul",
        name=name,
        dtype=str(dtype).replace("torch.", ""),
        ours=lambda: NF.matmul(a, b),
        torch=lambda: torch.matmul(a, b),
        flops=2.0 * M * N * K * (batch or 1),
    )


def cases(device: str, quick: bool, dtype: str = "float32"):
    if dtype == "bfloat16":  # the bfloat16 GEMM (CPU): square sizes, edges, layouts, skinny
        if device != "cpu":
            return []
        bf = torch.bfloat16
        sizes = (
            [(512,) * 3, (1024,) * 3]
            if quick
            else [(n,) * 3 for n in (64, 128, 256, 512, 1024, 2048)]
        )
        out = [_case(*s, device, dtype=bf) for s in sizes]
        if not quick:
            out += [
                _case(1000, 1000, 1000, device, dtype=bf),
                _case(1024, 1024, 1024, device, dtype=bf, ta=True),
                _case(1024, 1024, 1024, device, dtype=bf, tb=True),
                _case(4096, 64, 1024, device, dtype=bf),
                _case(64, 4096, 4096, device, dtype=bf),
                _case(128, 128, 128, device, dtype=bf, batch=64),
            ]
        return out
    if quick:
        sizes = [(512, 512, 512), (1024, 1024, 1024)]
        return [_case(*s, device) for s in sizes]
    out = [_case(n, n, n, device) for n in (64, 128, 256, 512, 1024, 2048)]
    if device == "cuda":
        out += [_case(4096, 4096, 4096, device)]
    out += [
        _case(1000, 1000, 1000, device),  # off every tile edge
        _case(1024, 1024, 1024, device, ta=True),
        _case(1024, 1024, 1024, device, tb=True),
        _case(4096, 64, 1024, device),  # tall-skinny
        _case(128, 128, 128, device, batch=64),
        _case(1024, 1024, 1024, device, dtype=torch.float64) if device == "cpu" else None,
    ]
    return [c for c in out if c is not None]


# ------------------------------------------------------------------------- parity check
# build(dtype, device, small) -> (inputs, ours, theirs, k): python -m nnkernels check (check.py).


def _matmul(dtype, device, small):
    r = sampler(1, dtype, device)
    m, k, n = (3, 4, 5) if small else (129, 65, 77)
    a, b = r(m, k), r(k, n)
    return [a, b], NF.matmul, torch.matmul, k


PARITY = {"matmul": _matmul}
