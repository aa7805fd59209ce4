"""LSTM benchmark cases: nnkernels.nn.LSTM / LSTMCell vs torch's (oneDNN on CPU, cuDNN on CUDA).
Compute-bound: GFLOP/s counts the GEMM flops (forward 2*T*B*4H*(I+H) per layer-direction; the
backward twice that, plus the input gradient when the input needs one) against the FMA peak."""

import torch

import nnkernels
import nnkernels.functional as NF

from .harness import Case, one_pass, sampler


def _lstm_flops(T, B, I, H, layers, D, backward, input_grad):
    total = 0.0
    for layer in range(layers):
        i = I if layer == 0 else D * H
        fwd = 2.0 * T * B * 4 * H * (i + H) * D
        total += fwd
        if backward:
            total += 2 * fwd  # dW_ih, dW_hh and the recurrent dh, plus dx of every layer...
            if layer == 0 and not input_grad:
                total -= 2.0 * T * B * 4 * H * i * D  # ...except the first layer's when not needed
    return total


def _lstm_case(device, T, B, I, H, mode, layers=1, bidirectional=False, input_grad=False):
    torch.manual_seed(0)
    kw = dict(num_layers=layers, bidirectional=bidirectional)
    ref = torch.nn.LSTM(I, H, **kw).to(device)
    ours = nnkernels.nn.LSTM(I, H, **kw).to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, device=device, requires_grad=input_grad)
    D = 2 if bidirectional else 1
    g = torch.randn(T, B, D * H, device=device)

    def make(m):
        wrt = list(m.parameters()) + ([x] if input_grad else [])
        return one_pass(lambda: m(x)[0], mode == "fwd+bwd", wrt, g)

    name = f"LSTM({I},{H}"
    name += f", layers={layers}" if layers > 1 else ""
    name += ", bidirectional" if bidirectional else ""
    name += f") T={T} B={B} {mode}" + (" (input grad)" if input_grad else "")
    return Case(
        op="lstm",
        name=name,
        dtype="float32",
        ours=make(ours),
        torch=make(ref),
        flops=_lstm_flops(T, B, I, H, layers, D, mode == "fwd+bwd", input_grad),
    )


def _cell_case(device, B, I, H, mode):
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(I, H).to(device)
    ours = nnkernels.nn.LSTMCell(I, H).to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, I, device=device)
    h, c = torch.randn(B, H, device=device), torch.randn(B, H, device=device)
    g = torch.randn(B, H, device=device)

    def make(m):
        return one_pass(lambda: m(x, (h, c))[0], mode == "fwd+bwd", list(m.parameters()), g)

    fwd_flops = 2.0 * B * 4 * H * (I + H)
    return Case(
        op="lstm",
        name=f"LSTMCell({I},{H}) B={B} step {mode}",
        dtype="float32",
        ours=make(ours),
        torch=make(ref),
        flops=fwd_flops * (3 if mode == "fwd+bwd" else 1),
    )


def cases(device: str, quick: bool):
    main = [
        _lstm_case(device, 50, 64, 256, 512, "fwd+bwd"),
        _cell_case(device, 64, 256, 512, "fwd"),
    ]
    if quick:
        return main
    return main + [
        _lstm_case(device, 50, 64, 256, 512, "fwd+bwd", input_grad=True),
        _lstm_case(device, 50, 64, 256, 512, "fwd"),
        _cell_case(device, 64, 256, 512, "fwd+bwd"),
        _lstm_case(device, 50, 32, 128, 256, "fwd+bwd", layers=2, bidirectional=True),
        _lstm_case(
            device, 28, 64, 8, 128, "fwd+bwd"
        ),  # a small sequence classifier (8 features, 28 steps)
    ]


# ------------------------------------------------------------------------- parity check
# build(dtype, device, small) -> (inputs, ours, theirs, k): python -m nnkernels check (check.py).


def _lstm_cell(dtype, device, small):
    r = sampler(7, dtype, device)
    b, i, h = (2, 3, 4) if small else (5, 7, 9)
    args = [r(b, i)]
    args += [r(b, h) for _ in range(2)]
    args += [r(4 * h, i, scale=0.3)]
    args += [r(4 * h, h, scale=0.3)]
    args += [r(4 * h) for _ in range(2)]

    def ours(x, h, c, *w):
        return NF.lstm_cell(x, (h, c), *w)

    def theirs(x, h, c, *w):
        return torch.lstm_cell(x, (h, c), *w)

    return args, ours, theirs, i + h


def _lstm(dtype, device, small):
    r = sampler(8, dtype, device)
    t, b, i, h = (3, 2, 2, 3) if small else (6, 3, 5, 7)
    sizes = []
    for layer in range(2):
        for _ in range(2):
            inp = i if layer == 0 else 2 * h
            sizes += [(4 * h, inp), (4 * h, h), (4 * h,), (4 * h,)]
    params = [r(*s, scale=0.3) for s in sizes]
    x = r(t, b, i)
    h0 = r(4, b, h)
    c0 = r(4, b, h)

    def ours(x, h0, c0, *p):
        out, (hn, cn) = NF.lstm(x, (h0, c0), list(p), True, 2, 0.0, True, True, False)
        return out, hn, cn

    def theirs(x, h0, c0, *p):  # torch.lstm returns (out, h_n, c_n)
        return torch.lstm(x, (h0, c0), list(p), True, 2, 0.0, True, True, False)

    return [x, h0, c0, *params], ours, theirs, t * b + i + 4 * h


PARITY = {"lstm_cell": _lstm_cell, "lstm": _lstm}
