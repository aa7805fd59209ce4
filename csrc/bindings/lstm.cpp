// Bindings of the LSTM: one layer in one direction over a whole sequence, forward and backward.
#include <utility>
#include <vector>

#include "bindings/binding.h"
#include "common/lstm_args.h"

namespace nnk {

// The kernels (cpu/lstm.cpp; T = float or double): the project's GEMM (the recurrent weight packed
// once per call) and one fused pointwise kernel per ISA over each step's batch rows.
namespace cpu {

// Throws std::bad_alloc when the packing scratch cannot grow (call outside parallel regions).
template <class T>
void lstm_layer_forward(const LstmLayer<T>& a);
template <class T>
void lstm_layer_backward(const LstmLayer<T>& a);

}  // namespace cpu

// The CUDA backend (cuda/lstm.cu), float32: the same time loop, the project's CUDA GEMM and one
// fused step kernel per step.
namespace cuda {
void lstm_layer_forward(const LstmLayer<float>& a, int device, void* stream);
void lstm_layer_backward(const LstmLayer<float>& a, int device, void* stream);
}  // namespace cuda

namespace {

// A (T, B, n) sequence view whose rows (t, b) are evenly spaced (row t*B + b at t*B*ld + b*ld) and
// unit-stride along n, as the whole-sequence GEMMs need. Returns the row stride.
int64_t seq_rows(const TensorView& v, const char* name, int64_t T, int64_t B, int64_t n) {
  check_shape(v, name, {T, B, n});
  const int64_t ld = B > 1 ? v.strides[1] : T > 1 ? v.strides[0] : n;
  NNK_CHECK_VALUE(
      v.numel() == 0 || ((n <= 1 || v.strides[2] == 1) && (T <= 1 || v.strides[0] == B * ld)), name,
      " must have unit stride along its last dim and evenly spaced (t, b) rows "
      "(a contiguous (T, B, n) tensor or a slice of one along the last dim), got "
      "strides (",
      v.strides[0], ", ", v.strides[1], ", ", v.strides[2], ")");
  return ld;
}

// A sequence argument as (T, B, n). A one-step call (LstmViews::one_step) passes (B, n) for the
// (1, B, n) sequence; its arguments must all be 2-D, a sequence call's all 3-D.
TensorView as_sequence(TensorView v, bool one_step, const char* name) {
  NNK_CHECK_VALUE(v.ndim == (one_step ? 2 : 3), name, " must be ",
                  one_step ? "(B, n) like input (one step)" : "(T, B, n) like input", ", got ",
                  v.ndim, " dims");
  if (!one_step) return v;
  for (int d = v.ndim; d > 0; --d) v.shape[d] = v.shape[d - 1], v.strides[d] = v.strides[d - 1];
  v.shape[0] = 1, v.strides[0] = 0;
  ++v.ndim;
  return v;
}

// A (B, H) state with unit stride along H. Returns the row stride.
int64_t state_rows(const TensorView& v, const char* name, int64_t B, int64_t H) {
  check_shape(v, name, {B, H});
  NNK_CHECK_VALUE(H <= 1 || B * H == 0 || v.strides[1] == 1, name,
                  " must have unit stride along its last dim, got strides (", v.strides[0], ", ",
                  v.strides[1], ")");
  return B > 1 ? v.strides[0] : H;
}

// A contiguous output of `shape`, writable.
void check_contiguous_out(const TensorView& v, const char* name,
                          std::initializer_list<int64_t> shape) {
  check_shape(v, name, shape);
  int64_t expect = 1;
  for (int d = v.ndim - 1; d >= 0 && v.numel() > 0; --d) {
    NNK_CHECK_VALUE(v.shape[d] <= 1 || v.strides[d] == expect, name, " must be contiguous");
    expect *= v.shape[d];
  }
  check_output(v, name);
}

// The views of one layer-direction call, checked: x (T, B, I); w_ih (4H, I); w_hh (4H, H); bias
// (4H,) or None; h0, c0 (B, H); y (T, B, H) out (may be a slice of a (T, B, 2H) output); gates
// (T, B, 4H) and c (T, B, H) contiguous. Parameters x .. c at positions at[0..8] (bias -1: none).
// one_step: x is (B, I) and every sequence argument (y, gates, c; dy, dx in the backward) 2-D
// too, a single step (an LSTMCell) without the views that would add T = 1 in Python.
struct LstmViews {
  TensorView x, w_ih, w_hh, bias, h0, c0, y, gates, c;
  int64_t T, B, I, H, ldx, ldy, ldh0, ldc0;
  bool one_step;

  LstmViews(const Call& call, const int (&at)[9]) {
    x = call.tensor(at[0]);
    check_float(x, "input");
    check_ndim(x, "input", {2, 3});
    one_step = x.ndim == 2;
    x = as_sequence(x, one_step, "input");
    if (x.device == Device::cuda)
      NNK_CHECK_IMPLEMENTED(x.dtype == DType::f32,
                            "lstm on CUDA computes in float32, got input of ", dtype_str(x));
    w_ih = call.tensor(at[1]);
    w_hh = call.tensor(at[2]);
    check_like(w_ih, "w_ih", x, "input");
    check_like(w_hh, "w_hh", x, "input");
    check_ndim(w_ih, "w_ih", {2});
    check_ndim(w_hh, "w_hh", {2});
    T = x.shape[0], B = x.shape[1], I = x.shape[2], H = w_hh.shape[1];
    check_shape(w_hh, "w_hh", {4 * H, H});
    check_shape(w_ih, "w_ih", {4 * H, I});
    if (at[3] >= 0 && call.given(at[3])) {
      bias = call.tensor(at[3]);
      check_vector(bias, "bias", 4 * H, x, "input");
    }
    ldx = seq_rows(x, "input", T, B, I);
    h0 = call.tensor(at[4]);
    c0 = call.tensor(at[5]);
    check_like(h0, "h0", x, "input");
    check_like(c0, "c0", x, "input");
    ldh0 = state_rows(h0, "h0", B, H);
    ldc0 = state_rows(c0, "c0", B, H);
    y = sequence(call.output(at[6]), "output");
    gates = sequence(call.output(at[7]), "gates");
    c = sequence(call.output(at[8]), "cell_states");
    check_like(y, "output", x, "input");
    check_like(gates, "gates", x, "input");
    check_like(c, "cell_states", x, "input");
    ldy = seq_rows(y, "output", T, B, H);
    check_contiguous_out(gates, "gates", {T, B, 4 * H});
    check_contiguous_out(c, "cell_states", {T, B, H});
  }

  // A sequence argument as (T, B, n): a one-step call's (B, n) gets its T = 1.
  TensorView sequence(const TensorView& v, const char* name) const {
    return as_sequence(v, one_step, name);
  }

  template <class T_>
  LstmLayer<T_> layer(bool reverse) const {
    LstmLayer<T_> a;
    a.steps = T, a.B = B, a.I = I, a.H = H;
    a.reverse = reverse;
    a.x = x.ptr<const T_>(), a.rsx = ldx, a.csx = 1;
    a.w_ih = w_ih.ptr<const T_>(), a.rsw_ih = w_ih.strides[0], a.csw_ih = w_ih.strides[1];
    a.w_hh = w_hh.ptr<const T_>(), a.rsw_hh = w_hh.strides[0], a.csw_hh = w_hh.strides[1];
    a.bias = bias.ptr<const T_>();
    a.h0 = h0.ptr<const T_>(), a.ldh0 = ldh0;
    a.c0 = c0.ptr<const T_>(), a.ldc0 = ldc0;
    a.y = y.ptr<T_>(), a.ldy = ldy;
    a.gates = gates.ptr<T_>();
    a.c = c.ptr<T_>();
    return a;
  }
};

// Multiply-adds of a layer-direction's forward.
double lstm_work(const LstmViews& v) {
  return double(v.T) * double(v.B) * double(4 * v.H) * double(v.I + v.H);
}

using Named = std::pair<const TensorView*, const char*>;

// No output overlaps an input or an earlier output.
void check_disjoint(const std::vector<Named>& outs, const std::vector<Named>& ins) {
  for (size_t o = 0; o < outs.size(); ++o) {
    for (const auto& [in, name] : ins)
      if (in->ndim) check_no_overlap(*outs[o].first, outs[o].second, *in, name);
    for (size_t p = 0; p < o; ++p)
      check_no_overlap(*outs[o].first, outs[o].second, *outs[p].first, outs[p].second);
  }
}

// One layer in one direction over the whole sequence: fills output (h_t), gates (activations,
// saved for lstm_backward) and cell_states (c_t).
py::object lstm_forward(Call& call) {
  const LstmViews v(call, {0, 1, 2, 3, 4, 5, 6, 7, 8});
  const bool reverse = call.flag(9, false);
  check_disjoint({{&v.y, "output"}, {&v.gates, "gates"}, {&v.c, "cell_states"}}, {{&v.x, "input"},
                                                                                  {&v.w_ih, "w_ih"},
                                                                                  {&v.w_hh, "w_hh"},
                                                                                  {&v.bias, "bias"},
                                                                                  {&v.h0, "h0"},
                                                                                  {&v.c0, "c0"}});
  run(
      v.x, lstm_work(v), [&](auto t) { cpu::lstm_layer_forward(v.layer<decltype(t)>(reverse)); },
      [&](auto s) { cuda::lstm_layer_forward(v.layer<float>(reverse), s.device, s.stream); });
  return py::none();
}
NNK_BINDING(
    lstm_forward, "input, w_ih, w_hh, bias, h0, c0, output, gates, cell_states, reverse=False",
    "One LSTM layer in one direction over a (T, B, I) sequence (or one step, every sequence "
    "argument (B, n)): output (T, B, H) = h_t, gates (T, B, 4H) = the activations (saved "
    "for lstm_backward), cell_states = c_t.");

// The backward of lstm_forward's call (same views; gates are overwritten with d loss / d
// pre-activations). grad_output (T, B, H) or None; grad_h, grad_c (B, H) contiguous: d loss /
// d h_n, d c_n in, d loss / d h0, d c0 out. grad_input (T, B, I) (or None) is written, or added to
// when accumulate; grad_w_ih, grad_w_hh (contiguous) and grad_bias are written (each may be None).
py::object lstm_backward(Call& call) {
  const LstmViews v(call, {0, 1, 2, -1, 3, 4, 5, 6, 7});
  const int64_t T = v.T, B = v.B, I = v.I, H = v.H;
  TensorView dy, dh = call.output(9), dc = call.output(10), dx, dw_ih, dw_hh, dbias;
  int64_t sdyt = 0, sdyb = 0, lddx = 0;
  if (call.given(8)) {
    dy = v.sequence(call.tensor(8), "grad_output");
    check_like(dy, "grad_output", v.x, "input");
    check_shape(dy, "grad_output", {T, B, H});
    NNK_CHECK_VALUE(H <= 1 || dy.numel() == 0 || dy.strides[2] == 1,
                    "grad_output must have unit stride along its last dim");
    sdyt = dy.strides[0], sdyb = dy.strides[1];
  }
  std::vector<Named> outs;
  for (auto [view, name] : {Named{&dh, "grad_h"}, Named{&dc, "grad_c"}}) {
    check_like(*view, name, v.x, "input");
    check_contiguous_out(*view, name, {B, H});
    outs.emplace_back(view, name);
  }
  if (call.given(11)) {
    dx = v.sequence(call.output(11), "grad_input");
    check_like(dx, "grad_input", v.x, "input");
    lddx = seq_rows(dx, "grad_input", T, B, I);
    check_output(dx, "grad_input");
    outs.emplace_back(&dx, "grad_input");
  }
  if (call.given(12)) {
    dw_ih = call.output(12);
    check_like(dw_ih, "grad_w_ih", v.x, "input");
    check_contiguous_out(dw_ih, "grad_w_ih", {4 * H, I});
    outs.emplace_back(&dw_ih, "grad_w_ih");
  }
  if (call.given(13)) {
    dw_hh = call.output(13);
    check_like(dw_hh, "grad_w_hh", v.x, "input");
    check_contiguous_out(dw_hh, "grad_w_hh", {4 * H, H});
    outs.emplace_back(&dw_hh, "grad_w_hh");
  }
  if (call.given(14)) {
    dbias = call.output(14);
    check_vector(dbias, "grad_bias", 4 * H, v.x, "input");
    check_output(dbias, "grad_bias");
    outs.emplace_back(&dbias, "grad_bias");
  }
  check_disjoint(outs, {{&v.x, "input"},
                        {&v.w_ih, "w_ih"},
                        {&v.w_hh, "w_hh"},
                        {&v.h0, "h0"},
                        {&v.c0, "c0"},
                        {&v.y, "output"},
                        {&v.c, "cell_states"},
                        {&v.gates, "gates"},
                        {&dy, "grad_output"}});
  const bool reverse = call.flag(15, false), accumulate = call.flag(16, false);
  const bool need_dh0 = call.flag(17, true);
  auto layer = [&](auto t) {
    using T_ = decltype(t);
    LstmLayer<T_> a = v.layer<T_>(reverse);
    a.dy = dy.ptr<const T_>(), a.sdyt = sdyt, a.sdyb = sdyb;
    a.dh = dh.ptr<T_>(), a.dc = dc.ptr<T_>(), a.need_dh0 = need_dh0;
    a.dx = dx.ptr<T_>(), a.lddx = lddx, a.dx_accumulate = accumulate;
    a.dw_ih = dw_ih.ptr<T_>();
    a.dw_hh = dw_hh.ptr<T_>();
    a.dbias = dbias.ptr<T_>();
    return a;
  };
  run(
      v.x, 2 * lstm_work(v), [&](auto t) { cpu::lstm_layer_backward(layer(t)); },
      [&](auto s) { cuda::lstm_layer_backward(layer(float()), s.device, s.stream); });
  return py::none();
}
NNK_BINDING(lstm_backward,
            "input, w_ih, w_hh, h0, c0, output, gates, cell_states, grad_output, grad_h, grad_c, "
            "grad_input, grad_w_ih, grad_w_hh, grad_bias, reverse=False, accumulate=False, "
            "grad_h0=True",
            "Backward through time of lstm_forward's call; grad_h / grad_c hold d loss / d h_n, "
            "d c_n on entry and d loss / d h0, d c0 on return (grad_h0=False: d h0 is not "
            "computed and grad_h holds no result). Overwrites gates.");

}  // namespace
}  // namespace nnk
