"""The LSTM: one node per layer (both directions), the time loop in C++.

Shapes (after the argument normalisation below):
  x (T, B, I) time-major, rows (t, b) evenly spaced and unit-stride along I
  h0, c0 (D, B, H), D = 2 for a bidirectional layer, unit-stride along H
  weights: per direction w_ih (4H, I), w_hh (4H, H), b_ih (4H,) or None, b_hh (4H,) or None
  -> y (T, B, D*H) (direction d writes columns d*H .. (d+1)*H), h_n and c_n (D, B, H)
The forward keeps each direction's gate activations (T, B, 4H) and cell states (T, B, H); the
backward turns the activations into the pre-activation gradients in place, so a second backward
through a retained graph first recomputes them. An LSTMCell is the same kernels for one step, in
their 2-D form (x (B, I), h' and c' (B, H), gates (B, 4H)).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import _native as N
from ._dispatch import Function, apply, compiling, primitive, recording_any


def _bias(b_ih, b_hh):
    if b_ih is None:
        return b_hh
    if b_hh is None:
        return b_ih
    return b_ih + b_hh  # (4H,): the kernels add one bias


def _bias_grads(db, need_ih, need_hh):
    """(d b_ih, d b_hh) from db: both biases add to the same pre-activations, so their gradients
    are equal; the second is a copy where both are needed (op outputs must not alias)."""
    return (db if need_ih else None, (db.clone() if need_ih else db) if need_hh else None)


def unit_last(t):
    """t itself when it is unit-stride along its last dim (what the kernels read), else a copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _per_direction(weights, D, has_bias):
    """The flat weights (w_ih, w_hh[, b_ih, b_hh] per direction) as 4 per direction."""
    per = 4 if has_bias else 2
    out = []
    for d in range(D):
        w = list(weights[per * d : per * (d + 1)])
        out += w if has_bias else [*w, None, None]
    return out


# --------------------------------------------------------------------------------- primitives


def _layer_out(x, h0, c0, weights, D, has_bias):
    T, B, _ = x.shape
    H = h0.shape[2]
    return [
        x.new_empty(T, B, D * H),
        x.new_empty(D, B, H),
        x.new_empty(D, B, H),
        *[x.new_empty(T, B, 4 * H) for _ in range(D)],
        *[x.new_empty(T, B, H) for _ in range(D)],
    ]


@primitive("lstm_layer", fake=_layer_out)
def layer_kernel(
    x: Tensor, h0: Tensor, c0: Tensor, weights: List[Tensor], D: int, has_bias: bool
) -> List[Tensor]:
    """[y, h_n, c_n, gates per direction..., cell states per direction...] of one layer."""
    T, B, _ = x.shape
    H = h0.shape[2]
    w4 = _per_direction(weights, D, has_bias)
    y = x.new_empty(T, B, D * H)
    gates, cells = [], []
    for d in range(D):
        w_ih, w_hh, b_ih, b_hh = w4[4 * d : 4 * d + 4]
        g, c = x.new_empty(T, B, 4 * H), x.new_empty(T, B, H)
        yd = y[:, :, d * H : (d + 1) * H] if D > 1 else y
        N.lstm_forward(x, w_ih, w_hh, _bias(b_ih, b_hh), h0[d], c0[d], yd, g, c, d == 1)
        gates.append(g)
        cells.append(c)
    # The last step of the forward direction is T-1, of the reverse direction 0.
    if D == 1:
        hn, cn = y[T - 1 :].clone(), cells[0][T - 1 :].clone()
    else:
        hn = torch.stack((y[T - 1, :, :H], y[0, :, H:]))
        cn = torch.stack((cells[0][T - 1], cells[1][0]))
    return [y, hn, cn, *gates, *cells]


def _backward(dy, dhn, dcn, x, h0, c0, y, weights, saved, D, has_bias, needs):
    """[dx, dh0, dc0, then per direction dw_ih, dw_hh, db_ih, db_hh] (empty where not needs[i]);
    dy, dhn, dcn may be None (zero). Overwrites the gate activations in saved."""
    T, B, I = x.shape
    H = h0.shape[2]
    w4 = _per_direction(weights, D, has_bias)
    gates, cells = saved[:D], saved[D:]
    dx = x.new_empty(T, B, I) if needs[0] else None
    dh0, dc0 = x.new_empty(D, B, H), x.new_empty(D, B, H)
    for buf, g in ((dh0, dhn), (dc0, dcn)):
        buf.zero_() if g is None else buf.copy_(g)
    dy = None if dy is None else unit_last(dy)
    out = [dx, dh0 if needs[1] else None, dc0 if needs[2] else None]
    for d in range(D):
        w_ih, w_hh = w4[4 * d], w4[4 * d + 1]
        n_ih, n_hh, n_bih, n_bhh = needs[3 + 4 * d : 7 + 4 * d]
        dw_ih = x.new_empty(w_ih.shape) if n_ih else None
        dw_hh = x.new_empty(w_hh.shape) if n_hh else None
        db = x.new_empty(4 * H) if n_bih or n_bhh else None
        cols = slice(d * H, (d + 1) * H)
        N.lstm_backward(
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
            grad_h0=needs[1],
        )
        out += [dw_ih, dw_hh, *_bias_grads(db, n_bih, n_bhh)]
    return [x.new_empty(0) if g is None else g for g in out]


def _backward_out(dy, dhn, dcn, x, h0, c0, y, weights, saved, D, has_bias, needs):
    per = 4 if has_bias else 2
    shapes = [x.shape, h0.shape, c0.shape]
    for d in range(D):
        w_ih, w_hh = weights[per * d], weights[per * d + 1]
        shapes += [w_ih.shape, w_hh.shape, w_ih.shape[:1], w_ih.shape[:1]]
    return [x.new_empty(s if n else (0,)) for s, n in zip(shapes, needs)]


@primitive("lstm_layer_backward", fake=_backward_out, eager=_backward)
def layer_backward_kernel(
    dy: Optional[Tensor],
    dhn: Optional[Tensor],
    dcn: Optional[Tensor],
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    y: Tensor,
    weights: List[Tensor],
    saved: List[Tensor],
    D: int,
    has_bias: bool,
    needs: List[bool],
) -> List[Tensor]:
    """[dx, dh0, dc0, then per direction dw_ih, dw_hh, db_ih, db_hh]; unneeded ones empty. Eagerly
    (_backward) it overwrites the gate activations in saved (the Function recomputes them for a
    second backward); the op works on a copy: a functional op may not overwrite its inputs."""
    gates = [g.clone() for g in saved[:D]]
    return _backward(
        dy, dhn, dcn, x, h0, c0, y, weights, gates + list(saved[D:]), D, has_bias, needs
    )


# ---------------------------------------------------------------------------------- Function


class LSTMLayerFunction(Function):
    """(D, has_bias, x, h0, c0, *flat weights) -> (y, h_n, c_n, gates..., cells...); the saved
    activations are not differentiable outputs (the op returns y, h_n, c_n)."""

    @staticmethod
    def forward(D, has_bias, x, h0, c0, *weights):
        return tuple(layer_kernel(x, h0, c0, list(weights), D, has_bias))

    @staticmethod
    def setup_context(ctx, inputs, output):
        D, has_bias, x, h0, c0, *weights = inputs
        ctx.D, ctx.has_bias, ctx.n_weights = D, has_bias, len(weights)
        ctx.consumed = False  # the backward has overwritten the gate activations
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zeros)
        ctx.mark_non_differentiable(*output[3:])
        ctx.save_for_backward(x, h0, c0, output[0], *weights, *output[3:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dhn, dcn, *unused):
        D, nw = ctx.D, ctx.n_weights
        x, h0, c0, y, *rest = ctx.saved_tensors
        weights, saved = list(rest[:nw]), list(rest[nw:])
        if not compiling():
            if ctx.consumed:  # a second backward (retain_graph): recompute what the first overwrote
                saved = layer_kernel(x, h0, c0, weights, D, ctx.has_bias)[3:]
            ctx.consumed = True
        per = 4 if ctx.has_bias else 2
        need_x, need_h, need_c, *need_w = ctx.needs_input_grad[2:]
        needs = [need_x, need_h, need_c]
        for d in range(D):
            mine = list(need_w[per * d : per * (d + 1)])
            needs += mine if per == 4 else [*mine, False, False]
        grads = layer_backward_kernel(
            dy, dhn, dcn, x, h0, c0, y, weights, saved, D, ctx.has_bias, needs
        )
        dweights = []
        for d in range(D):
            dweights += [grads[3 + 4 * d + k] if needs[3 + 4 * d + k] else None for k in range(per)]
        return (None, None, *[g if n else None for g, n in zip(grads[:3], needs)], *dweights)


def lstm_layer(x, h0, c0, weights, D):
    """(y, h_n, c_n) of one layer (both directions when D == 2); weights: 4 per direction,
    biases None when absent (see the module docstring)."""
    has_bias = weights[2] is not None
    flat = [w for w in weights if w is not None]
    if recording_any((x, h0, c0, *flat)):
        return apply(LSTMLayerFunction, D, has_bias, x, h0, c0, *flat)[:3]
    return tuple(layer_kernel(x, h0, c0, flat, D, has_bias)[:3])


# ------------------------------------------------------------------------------------ the cell
# One step (an LSTMCell) through the kernels' one-step form (every sequence argument 2-D): h' is
# the output and c' the cell state the kernel writes, so unlike a T = 1 layer nothing is reshaped
# to (1, B, n) or copied out of a sequence - a cell's cost per call is mostly this Python.


def _cell_out(x, h, c, w_ih, w_hh, bias):
    B, H = h.shape
    return [x.new_empty(B, H), x.new_empty(B, H), x.new_empty(B, 4 * H)]


@primitive("lstm_cell", fake=_cell_out)
def cell_kernel(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor]
) -> List[Tensor]:
    """[h', c', gate activations (B, 4H)] of one step: x (B, I), h and c (B, H), bias = b_ih +
    b_hh (4H,) or None."""
    h1, c1, gates = _cell_out(x, h, c, w_ih, w_hh, bias)
    N.lstm_forward(x, w_ih, w_hh, bias, h, c, h1, gates, c1)
    return [h1, c1, gates]


def _cell_backward(dh1, dc1, x, h, c, w_ih, w_hh, h1, c1, gates, needs):
    """[dx, dh, dc, dw_ih, dw_hh, dbias] (empty where not needs[i]; needs[5]: either bias); dh1,
    dc1 may be None (zero). Overwrites gates."""
    dh = torch.zeros_like(h) if dh1 is None else dh1.clone(memory_format=torch.contiguous_format)
    dc = torch.zeros_like(c) if dc1 is None else dc1.clone(memory_format=torch.contiguous_format)
    dx, dw_ih, dw_hh, db = (
        x.new_empty(s) if n else None
        for s, n in zip((x.shape, w_ih.shape, w_hh.shape, w_ih.shape[:1]), needs[:1] + needs[3:])
    )
    N.lstm_backward(
        x, w_ih, w_hh, h, c, h1, gates, c1, None, dh, dc, dx, dw_ih, dw_hh, db, grad_h0=needs[1]
    )
    grads = (dx, dh if needs[1] else None, dc if needs[2] else None, dw_ih, dw_hh, db)
    return [x.new_empty(0) if g is None else g for g in grads]


def _cell_backward_out(dh1, dc1, x, h, c, w_ih, w_hh, h1, c1, gates, needs):
    shapes = (x.shape, h.shape, c.shape, w_ih.shape, w_hh.shape, w_ih.shape[:1])
    return [x.new_empty(s if n else (0,)) for s, n in zip(shapes, needs)]


@primitive("lstm_cell_backward", fake=_cell_backward_out, eager=_cell_backward)
def cell_backward_kernel(
    dh1: Optional[Tensor],
    dc1: Optional[Tensor],
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    h1: Tensor,
    c1: Tensor,
    gates: Tensor,
    needs: List[bool],
) -> List[Tensor]:
    """[dx, dh, dc, dw_ih, dw_hh, dbias]; unneeded ones empty. Eagerly it overwrites gates (the
    Function recomputes them for a second backward); the op works on a copy."""
    return _cell_backward(dh1, dc1, x, h, c, w_ih, w_hh, h1, c1, gates.clone(), needs)


class LSTMCellFunction(Function):
    """(x, h, c, w_ih, w_hh, b_ih, b_hh) -> (h', c', gates); gates are not differentiable."""

    @staticmethod
    def forward(x, h, c, w_ih, w_hh, b_ih, b_hh):
        return tuple(cell_kernel(x, h, c, w_ih, w_hh, _bias(b_ih, b_hh)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.consumed = False
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(*inputs, *output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh1, dc1, unused):
        x, h, c, w_ih, w_hh, b_ih, b_hh, h1, c1, gates = ctx.saved_tensors
        if not compiling():
            if ctx.consumed:  # a second backward (retain_graph): recompute what the first overwrote
                gates = cell_kernel(x, h, c, w_ih, w_hh, _bias(b_ih, b_hh))[2]
            ctx.consumed = True
        n = ctx.needs_input_grad
        needs = [*n[:5], n[5] or n[6]]
        dx, dh, dc, dw_ih, dw_hh, db = (
            g if k else None
            for g, k in zip(
                cell_backward_kernel(dh1, dc1, x, h, c, w_ih, w_hh, h1, c1, gates, needs), needs
            )
        )
        return dx, dh, dc, dw_ih, dw_hh, *_bias_grads(db, n[5], n[6])


def cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """(h', c') of one step; x (B, I), h and c (B, H) unit-stride along their last dim."""
    if recording_any((x, h, c, w_ih, w_hh, b_ih, b_hh)):
        return apply(LSTMCellFunction, x, h, c, w_ih, w_hh, b_ih, b_hh)[:2]
    return tuple(cell_kernel(x, h, c, w_ih, w_hh, _bias(b_ih, b_hh))[:2])


# ------------------------------------------------------------------- argument normalisation


def _check_weights(w_ih, w_hh, b_ih, b_hh, input_size, hidden_size, where):
    """w_ih (4H, input_size), w_hh (4H, H), biases (4H,) or None."""
    g = 4 * hidden_size
    for w, name, shape in (
        (w_ih, "w_ih", (g, input_size)),
        (w_hh, "w_hh", (g, hidden_size)),
        (b_ih, "b_ih", (g,)),
        (b_hh, "b_hh", (g,)),
    ):
        if w is not None and tuple(w.shape) != shape:
            raise ValueError(f"{where}: {name} must have shape {shape}, got {tuple(w.shape)}")


def _state(t, name, shape, ref):
    """A state tensor of `shape` with unit stride along H (the kernels' layout), or zeros."""
    if t is None:
        return ref.new_zeros(shape)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return unit_last(t)


def hx_pair(hx, where):
    if hx is None:
        return None, None
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(
            f"{where}: hx must be a tuple (h, c) of two tensors, got {type(hx).__name__}"
        )
    return hx


def lstm_cell(input, h, c, w_ih, w_hh, b_ih, b_hh):
    """(h', c') of one torch.nn.LSTMCell step (h, c None: zeros)."""
    if input.dim() not in (1, 2):
        raise ValueError(f"lstm_cell: input must be (B, I) or (I,), got shape {tuple(input.shape)}")
    if w_hh.dim() != 2:
        raise ValueError(f"lstm_cell: w_hh must be 2-D (4H, H), got shape {tuple(w_hh.shape)}")
    H = w_hh.shape[1]
    _check_weights(w_ih, w_hh, b_ih, b_hh, input.shape[-1], H, "lstm_cell")
    batched = input.dim() == 2
    x = input if batched else input.unsqueeze(0)
    B = x.shape[0]
    state = (B, H) if batched else (H,)
    h = _state(h, "h", state, x).reshape(B, H)
    c = _state(c, "c", state, x).reshape(B, H)
    h1, c1 = cell(unit_last(x), h, c, w_ih, w_hh, b_ih, b_hh)
    return (h1, c1) if batched else (h1[0], c1[0])


def lstm(input, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """torch.lstm's functional form: -> (output, (h_n, c_n)); h0, c0 None: zeros."""
    D = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    if len(params) != num_layers * D * per:
        raise ValueError(
            f"lstm: expected {num_layers * D * per} parameter tensors for num_layers={num_layers}, "
            f"bidirectional={bidirectional}, bias={has_biases}, got {len(params)}"
        )
    if input.dim() not in (2, 3):
        raise ValueError(
            f"lstm: input must be (T, B, I), (B, T, I) with batch_first, or unbatched (T, I); got "
            f"shape {tuple(input.shape)}"
        )
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(1)
    if batched and batch_first:
        x = x.transpose(0, 1)
    T, B, _ = x.shape
    if T == 0:
        raise ValueError("lstm: input has sequence length 0; it must be at least 1")
    H = params[1].shape[1] if params[1].dim() == 2 else -1
    if H < 1:
        raise ValueError(
            f"lstm: params[1] (weight_hh_l0) must be (4H, H), got {tuple(params[1].shape)}"
        )
    state = (num_layers * D, B, H) if batched else (num_layers * D, H)
    h0 = _state(h0, "h0 (hx[0])", state, x).reshape(num_layers * D, B, H)
    c0 = _state(c0, "c0 (hx[1])", state, x).reshape(num_layers * D, B, H)
    hn, cn = [], []
    for layer in range(num_layers):
        weights = []
        for d in range(D):
            k = (layer * D + d) * per
            w_ih, w_hh = params[k], params[k + 1]
            b_ih, b_hh = (params[k + 2], params[k + 3]) if has_biases else (None, None)
            name = f"lstm layer {layer}{' reverse' if d else ''}"
            if w_ih.dim() != 2 or w_ih.shape[1] != x.shape[2]:
                what = "input" if layer == 0 else f"the output of layer {layer - 1}"
                raise ValueError(
                    f"{name}: {what} has {x.shape[2]} features but weight_ih expects "
                    f"{w_ih.shape[-1] if w_ih.dim() else '?'} (shape {tuple(w_ih.shape)})"
                )
            _check_weights(w_ih, w_hh, b_ih, b_hh, x.shape[2], H, name)
            weights += [w_ih, w_hh, b_ih, b_hh]
        if x.stride(2) != 1 or (B > 1 and x.stride(0) != B * x.stride(1)):
            x = x.contiguous()  # the input projection reads (t, b) rows evenly spaced
        rows = slice(layer * D, (layer + 1) * D)
        x, h, c = lstm_layer(x, h0[rows], c0[rows], weights, D)
        hn.append(h)
        cn.append(c)
        if train and dropout > 0 and layer + 1 < num_layers:
            x = torch.nn.functional.dropout(x, dropout, training=True)
    h_n, c_n = torch.cat(hn), torch.cat(cn)
    out = x.transpose(0, 1) if batched and batch_first else x
    if not batched:
        return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    return out, (h_n, c_n)
