"""Autograd Function of the LSTM: one node per layer (both directions), the time loop in C++.

Shapes (after nnkernels.functional has checked and normalised the arguments):
  x (T, B, I) time-major, rows (t, b) evenly spaced and unit-stride along I
  h0, c0 (D, B, H), D = 2 for a bidirectional layer, unit-stride along H
  weights: per direction w_ih (4H, I), w_hh (4H, H), b_ih (4H,) or None, b_hh (4H,) or None
  -> y (T, B, D*H) (direction d writes columns d*H .. (d+1)*H), h_n and c_n (D, B, H)
The forward keeps each direction's gate activations (T, B, 4H) and cell states (T, B, H); the
backward turns the activations into the pre-activation gradients in place, so a second backward
through a retained graph first recomputes them.
"""

import torch
from torch.autograd.function import once_differentiable

from .. import _ops


def _bias(b_ih, b_hh):
    if b_ih is None:
        return b_hh
    if b_hh is None:
        return b_ih
    return b_ih + b_hh  # (4H,): the kernels add one bias


def _forward(x, h0, c0, weights, D):
    """Returns y, h_n, c_n and the per-direction gate activations and cell states."""
    T, B, _ = x.shape
    H = h0.shape[2]
    y = x.new_empty(T, B, D * H)
    gates, cells = [], []
    for d in range(D):
        w_ih, w_hh, b_ih, b_hh = weights[4 * d : 4 * d + 4]
        g, c = x.new_empty(T, B, 4 * H), x.new_empty(T, B, H)
        yd = y[:, :, d * H : (d + 1) * H] if D > 1 else y
        _ops.lstm_forward(x, w_ih, w_hh, _bias(b_ih, b_hh), h0[d], c0[d], yd, g, c, d == 1)
        gates.append(g)
        cells.append(c)
    # The last step of the forward direction is T-1, of the reverse direction 0.
    if D == 1:
        hn, cn = y[T - 1 :].clone(), cells[0][T - 1 :].clone()
    else:
        hn = torch.stack((y[T - 1, :, :H], y[0, :, H:]))
        cn = torch.stack((cells[0][T - 1], cells[1][0]))
    return y, hn, cn, gates, cells


def _unit_last(t):
    """t itself when it is unit-stride along its last dim (what the kernels read), else a copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


class LSTMLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, D, x, h0, c0, *weights):
        y, hn, cn, gates, cells = _forward(x, h0, c0, weights, D)
        ctx.D = D
        ctx.consumed = False  # the backward has overwritten the gate activations
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zeros)
        ctx.save_for_backward(x, h0, c0, y, *weights, *gates, *cells)
        return y, hn, cn

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dhn, dcn):
        D = ctx.D
        x, h0, c0, y, *rest = ctx.saved_tensors
        weights, gates, cells = rest[: 4 * D], rest[4 * D : 5 * D], rest[5 * D :]
        if ctx.consumed:  # a second backward (retain_graph): recompute what the first overwrote
            _, _, _, gates, cells = _forward(x, h0, c0, weights, D)
        ctx.consumed = True
        needs = ctx.needs_input_grad[1:]  # (x, h0, c0, *weights)
        grads = _backward(dy, dhn, dcn, x, h0, c0, y, weights, gates, cells, D, needs)
        return (None, *grads)


def _backward(dy, dhn, dcn, x, h0, c0, y, weights, gates, cells, D, needs):
    """[dx, dh0, dc0, then per direction dw_ih, dw_hh, db_ih, db_hh] (None where not needs[i]);
    dy, dhn, dcn may be None (zero). Overwrites gates."""
    T, B, I = x.shape
    H = h0.shape[2]
    dx = x.new_empty(T, B, I) if needs[0] else None
    dh0, dc0 = x.new_empty(D, B, H), x.new_empty(D, B, H)
    for buf, g in ((dh0, dhn), (dc0, dcn)):
        buf.zero_() if g is None else buf.copy_(g)
    dy = None if dy is None else _unit_last(dy)
    dweights = []
    for d in range(D):
        w_ih, w_hh = weights[4 * d], weights[4 * d + 1]
        n_ih, n_hh, n_bih, n_bhh = needs[3 + 4 * d : 7 + 4 * d]
        dw_ih = x.new_empty(w_ih.shape) if n_ih else None
        dw_hh = x.new_empty(w_hh.shape) if n_hh else None
        db = x.new_empty(4 * H) if n_bih or n_bhh else None
        cols = slice(d * H, (d + 1) * H)
        _ops.lstm_backward(
            x,
            w_ih,
            w_hh,
            h0[d],
            c0[d],
            y[:, :, cols],
            gates[d],
            cells[d],
            None if dy is None else dy[:, :, cols],
            dh0[d],
            dc0[d],
            dx,
            dw_ih,
            dw_hh,
            db,
            d == 1,
            d == 1,
        )
        # d loss / d b_ih = d loss / d b_hh (both add to the same pre-activations)
        dweights += [dw_ih, dw_hh, db if n_bih else None, db if n_bhh else None]
    return [dx, dh0 if needs[1] else None, dc0 if needs[2] else None, *dweights]


def lstm_layer(x, h0, c0, weights, D):
    """(y, h_n, c_n) of one layer (both directions when D == 2); see the module docstring."""
    if torch.compiler.is_compiling():
        return _library.lstm(x, h0, c0, weights, D)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, h0, c0, *weights)
    ):
        return LSTMLayerFunction.apply(D, x, h0, c0, *weights)
    return _forward(x, h0, c0, weights, D)[:3]


from .. import _library  # noqa: E402  (it builds on this module)
