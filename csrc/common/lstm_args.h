// The arguments of one LSTM layer in one direction over a whole sequence (shared by the CPU and
// CUDA kernels; the loop over time is common/lstm_driver.h). torch.nn.LSTM's math, gates in the
// order (i, f, g, o), each a block of H columns of the (B, 4H) gate rows:
//   gates_t = x_t W_ih^T + h_{t-1} W_hh^T + b      i, f, o = sigmoid(.), g = tanh(.)
//   c_t = f * c_{t-1} + i * g                      h_t = o * tanh(c_t)
// Rows are time-major: row t*B + b is batch item b at step t. The reverse direction of a
// bidirectional layer runs t = T-1 .. 0 (h_{t+1} feeds step t).
#pragma once
#include <cstdint>

namespace nnk {

template <class T>
struct LstmLayer {
  int64_t steps = 0, B = 0, I = 0, H = 0;  // T (sequence length), batch, input, hidden
  bool reverse = false;
  const T* x = nullptr;  // (T*B, I): x[r*rsx + k*csx]
  int64_t rsx = 0, csx = 0;
  const T* w_ih = nullptr;  // (4H, I): w_ih[n*rsw_ih + k*csw_ih]
  int64_t rsw_ih = 0, csw_ih = 0;
  const T* w_hh = nullptr;  // (4H, H)
  int64_t rsw_hh = 0, csw_hh = 0;
  const T* bias = nullptr;  // (4H,): b_ih + b_hh, or null
  const T* h0 = nullptr;    // (B, H), rows ldh0 apart, unit-stride
  const T* c0 = nullptr;    // (B, H), rows ldc0 apart, unit-stride
  int64_t ldh0 = 0, ldc0 = 0;
  T* y = nullptr;  // (T*B, H) out: h_t of item b at y + (t*B + b) * ldy, unit-stride
  int64_t ldy = 0;
  T* gates = nullptr;  // (T*B, 4H) contiguous: forward writes the activations (saved for the
                       // backward), the backward overwrites them with d loss / d pre-activation
  T* c = nullptr;      // (T*B, H) contiguous out: c_t

  // Backward only.
  const T* dy = nullptr;  // d loss / d y_t at dy + t*sdyt + b*sdyb, unit-stride; null: zero
  int64_t sdyt = 0, sdyb = 0;
  T* dh = nullptr;       // (B, H) contiguous: d loss / d h_n in, d loss / d h0 out (if need_dh0)
  bool need_dh0 = true;  // false: the last step's dh GEMM is skipped (dh then holds no result)
  T* dc = nullptr;       // (B, H) contiguous: d loss / d c_n in, d loss / d c0 out
  T* dx = nullptr;       // (T*B, I) rows lddx apart, unit-stride, or null
  int64_t lddx = 0;
  bool dx_accumulate = false;  // dx += (the second direction of a bidirectional layer)
  T* dw_ih = nullptr;          // (4H, I) contiguous, or null
  T* dw_hh = nullptr;          // (4H, H) contiguous, or null
  T* dbias = nullptr;          // (4H,), or null: d loss / d b_ih (= d loss / d b_hh)
};

// The pointwise part of one time step over the B rows of the batch.
template <class T>
struct LstmStep {
  int64_t B = 0, H = 0;
  T* gates = nullptr;         // (B, 4H) contiguous; forward: pre-activations in, activations out;
                              // backward: activations in, d loss / d pre-activations out
  const T* c_prev = nullptr;  // (B, H) rows ldcp apart: c_{t-1}
  int64_t ldcp = 0;
  T* c = nullptr;  // (B, H) contiguous: c_t (forward out, backward in)
  T* h = nullptr;  // forward out: (B, H) rows ldh apart
  int64_t ldh = 0;
  const T* dh_out = nullptr;  // backward: d loss / d h_t from the output, rows lddh apart; or null
  int64_t lddh = 0;
  const T* dh_rec = nullptr;  // backward: (B, H) contiguous: d loss / d h_t through step t+1
  T* dc = nullptr;            // backward: (B, H) contiguous: d loss / d c_t in, / d c_{t-1} out
};

}  // namespace nnk
