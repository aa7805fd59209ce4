"""batch_norm benchmark cases: nnkernels.nn.BatchNorm1d/2d vs torch's, training forward,
training forward+backward and eval forward. Memory-bound: GB/s counts the tensor passes the
fused kernels need at least (forward: read x, write y; backward: read dy and x, write dx), against
the measured copy bandwidth; peak extra memory per call beside."""

import torch

import nnkernels

from .harness import Case, one_pass


def _case(shape, device, mode, channels_last=False):
    c = shape[1]
    x = torch.randn(*shape, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    cls = "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"
    ref = getattr(torch.nn, cls)(c).to(device)
    ours = getattr(nnkernels.nn, cls)(c).to(device)
    x.requires_grad_(mode == "fwd+bwd")
    g = torch.randn_like(x)
    for m in (ref, ours):
        m.train(mode != "eval")

    def make(m):
        return one_pass(lambda: m(x), mode == "fwd+bwd", (x, m.weight, m.bias), g)

    passes = {"fwd": 2, "eval": 2, "fwd+bwd": 5}[mode]
    name = "x".join(map(str, shape)) + (" channels_last" if channels_last else "") + f" {mode}"
    return Case(
        op="batch_norm",
        name=name,
        dtype="float32",
        ours=make(ours),
        torch=make(ref),
        bytes=passes * x.numel() * x.element_size(),
        memory=True,
    )


def cases(device: str, quick: bool):
    big = (32, 64, 56, 56)
    if quick:
        return [_case(big, device, "fwd+bwd"), _case(big, device, "eval")]
    return [
        _case(big, device, "fwd+bwd"),
        _case(big, device, "fwd"),
        _case(big, device, "eval"),
        _case(big, device, "fwd+bwd", channels_last=True),
        _case((64, 32, 24, 24), device, "fwd+bwd"),  # the course CNN's batch norm
        _case((256, 300), device, "fwd+bwd"),  # BatchNorm1d after a Linear
    ]
