"""LSTM benchmark cases: nnkernels.nn.LSTM / LSTMCell vs torch's (oneDNN on CPU, cuDNN on CUDA).
Compute-bound: GFLOP/s counts the GEMM flops (forward 2*T*B*4H*(I+H) per layer-direction; the
backward twice that, plus the input gradient when the input needs one) against the FMA peak."""

import torch

import nnkernels

from .harness import Case, one_pass


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
