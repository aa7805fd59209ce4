// One LSTM layer in one direction over a whole sequence (common/lstm_args.h), written once for
// both backends. A Backend supplies
//   gemm(const Gemm<T>&)                      the project's GEMM (CPU or CUDA)
//   const T* pack_b(K, N, B, rsb, csb)        B packed ahead for repeated products, or null
//   step_forward / step_backward(LstmStep<T>) the fused pointwise kernels
//   sum_rows(R, N, x, rsx, csx, out)          column sums (the bias gradient)
//   row_blocks(B, rec, fn)                    runs the recurrence fn(b0, b1, be') over blocks of
//                                             the batch rows, each with a backend be' (a block
//                                             may run on its own thread; rec is its step GEMM)
//
// Forward:  gates = x W_ih^T + b for all T*B rows as one GEMM, then per step one GEMM adds
//           h_{t-1} W_hh^T into the step's gate rows and one pointwise kernel finishes the step.
// Backward: per step (last first) the pointwise kernel turns the saved activations into dgates_t
//           and updates dc, then one GEMM gives dh_{t-1} = dgates_t W_hh. After the loop, GEMMs
//           over all steps at once: dx = dgates W_ih, dW_ih = dgates^T x, dW_hh = dgates^T h_prev
//           (h_prev is y shifted by one step, plus h0 for the first step), db = column sums.
// W_hh is used at every step, so it is packed once per call (T > 1).
// Batch rows never meet in the recurrence (row b of step t needs only row b of step t-1), so the
// per-step loop runs on blocks of rows: on the CPU one thread per block through the whole
// sequence, with no fork or barrier per step.
#pragma once
#include <cstdint>

#include "common/gemm_args.h"
#include "common/lstm_args.h"

namespace nnk {

// C (M x N, rows rsc apart, unit-stride) = A (M x K) . B (K x N) + beta C; strides as in Gemm.
template <class T>
Gemm<T> product(int64_t M, int64_t N, int64_t K, const T* A, int64_t rsa, int64_t csa, const T* B,
                int64_t rsb, int64_t csb, T* C, int64_t rsc, T beta = T(0)) {
  Gemm<T> g;
  g.M = M, g.N = N, g.K = K;
  g.A = A, g.rsa = rsa, g.csa = csa;
  g.B = B, g.rsb = rsb, g.csb = csb;
  g.C = C, g.rsc = rsc, g.csc = 1;
  g.beta = beta;
  return g;
}

template <class T, class Backend>
void lstm_layer_forward(const LstmLayer<T>& a, Backend& be) {
  const int64_t G = 4 * a.H, TB = a.steps * a.B;
  // (T*B, 4H) = x (T*B, I) . W_ih^T (I, 4H) + b
  Gemm<T> proj = product(TB, G, a.I, a.x, a.rsx, a.csx, a.w_ih, a.csw_ih, a.rsw_ih, a.gates, G);
  proj.bias_n = a.bias;
  be.gemm(proj);
  if (TB == 0 || a.H == 0) return;

  // gates_t (B, 4H) += h_{t-1} (B, H) . W_hh^T (H, 4H); A is set per step
  Gemm<T> rec = product<T>(a.B, G, a.H, nullptr, 0, 1, a.w_hh, a.csw_hh, a.rsw_hh, nullptr, G, 1);
  rec.packed_b = a.steps > 1 ? be.pack_b(rec.K, rec.N, rec.B, rec.rsb, rec.csb) : nullptr;

  be.row_blocks(a.B, rec, [&](int64_t b0, int64_t b1, auto& rb) {
    Gemm<T> g = rec;
    g.M = b1 - b0;
    LstmStep<T> st;
    st.B = b1 - b0;
    st.H = a.H;
    st.ldh = a.ldy;
    for (int64_t s = 0; s < a.steps; ++s) {
      const int64_t t = a.reverse ? a.steps - 1 - s : s, tp = a.reverse ? t + 1 : t - 1;
      const int64_t r = t * a.B + b0, rp = tp * a.B + b0;  // this block's first row at t, t-1
      g.A = s == 0 ? a.h0 + b0 * a.ldh0 : a.y + rp * a.ldy;
      g.rsa = s == 0 ? a.ldh0 : a.ldy;
      g.C = a.gates + r * G;
      rb.gemm(g);
      st.gates = g.C;
      st.c_prev = s == 0 ? a.c0 + b0 * a.ldc0 : a.c + rp * a.H;
      st.ldcp = s == 0 ? a.ldc0 : a.H;
      st.c = a.c + r * a.H;
      st.h = a.y + r * a.ldy;
      rb.step_forward(st);
    }
  });
}

template <class T, class Backend>
void lstm_layer_backward(const LstmLayer<T>& a, Backend& be) {
  const int64_t G = 4 * a.H, TB = a.steps * a.B;
  if (a.B > 0 && a.H > 0) {
    // dh (B, H) = dgates_t (B, 4H) . W_hh (4H, H); A is set per step
    Gemm<T> rec = product<T>(a.B, a.H, G, nullptr, G, 1, a.w_hh, a.rsw_hh, a.csw_hh, a.dh, a.H);
    rec.packed_b = a.steps > 1 ? be.pack_b(rec.K, rec.N, rec.B, rec.rsb, rec.csb) : nullptr;

    be.row_blocks(a.B, rec, [&](int64_t b0, int64_t b1, auto& rb) {
      Gemm<T> g = rec;
      g.M = b1 - b0;
      g.C = a.dh + b0 * a.H;
      LstmStep<T> st;
      st.B = b1 - b0;
      st.H = a.H;
      st.lddh = a.sdyb;
      st.dh_rec = a.dh + b0 * a.H;
      st.dc = a.dc + b0 * a.H;
      for (int64_t s = a.steps - 1; s >= 0; --s) {
        const int64_t t = a.reverse ? a.steps - 1 - s : s, tp = a.reverse ? t + 1 : t - 1;
        const int64_t r = t * a.B + b0;
        st.gates = a.gates + r * G;
        st.c = a.c + r * a.H;
        st.c_prev = s == 0 ? a.c0 + b0 * a.ldc0 : a.c + (tp * a.B + b0) * a.H;
        st.ldcp = s == 0 ? a.ldc0 : a.H;
        st.dh_out = a.dy ? a.dy + t * a.sdyt + b0 * a.sdyb : nullptr;
        rb.step_backward(st);
        // dh of the step before: d loss / d h0 after the first step, which nobody may need (an
        // LSTMCell whose h does not require grad: a third of its backward's flops).
        if (s == 0 && !a.need_dh0) break;
        g.A = st.gates;
        rb.gemm(g);
      }
    });
  }

  // The products over all steps; with T*B == 0 they write zeros (K = 0). dgates^T (4H, rows) is
  // read in place: element (n, r) at gates[r * 4H + n].
  if (a.dx)  // (T*B, I) (+)= dgates (T*B, 4H) . W_ih (4H, I)
    be.gemm(product(TB, a.I, G, a.gates, G, 1, a.w_ih, a.rsw_ih, a.csw_ih, a.dx, a.lddx,
                    a.dx_accumulate ? T(1) : T(0)));
  if (a.dw_ih)  // (4H, I) = dgates^T (4H, T*B) . x (T*B, I)
    be.gemm(product(G, a.I, TB, a.gates, 1, G, a.x, a.rsx, a.csx, a.dw_ih, a.I));
  if (a.dw_hh && a.steps > 0) {
    // (4H, H) = dgates^T . h_prev: the step fed by h0 (t = 0, or t = T-1 in reverse), then the
    // T-1 steps fed by y (one step behind).
    const int64_t rows_y = (a.steps - 1) * a.B;
    const T* dg_0 = a.gates + (a.reverse ? rows_y * G : 0);
    const T* dg_y = a.gates + (a.reverse ? 0 : a.B * G);
    const T* y_prev = a.y + (a.reverse ? a.B * a.ldy : 0);
    be.gemm(product(G, a.H, a.B, dg_0, 1, G, a.h0, a.ldh0, 1, a.dw_hh, a.H));
    if (rows_y > 0)
      be.gemm(product(G, a.H, rows_y, dg_y, 1, G, y_prev, a.ldy, 1, a.dw_hh, a.H, T(1)));
  } else if (a.dw_hh) {
    be.gemm(product<T>(G, a.H, 0, nullptr, 1, G, nullptr, 0, 1, a.dw_hh, a.H));  // zeros
  }
  if (a.dbias) be.sum_rows(TB, G, a.gates, G, 1, a.dbias);
}

}  // namespace nnk
