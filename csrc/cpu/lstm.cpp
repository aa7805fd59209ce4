// LSTM, CPU backend of common/lstm_driver.h: the project's GEMM, the fused step kernels of the
// active ISA, rows of a step split across threads. Two parts: the fused pointwise kernels of one
// time step (common/lstm_args.h: LstmStep), compiled once per ISA into the LstmKernels table, and
// the sequence driver, compiled once.
#include <cstdint>

#include "common/lstm_args.h"
#include "common/simd.h"
#include "common/simd_math.h"

namespace nnk {
namespace cpu {

template <class T>
struct LstmKernels {
  // Rows [b0, b1) of the step.
  void (*forward_rows)(const LstmStep<T>& s, int64_t b0, int64_t b1);
  void (*backward_rows)(const LstmStep<T>& s, int64_t b0, int64_t b1);
};

}  // namespace cpu
}  // namespace nnk

// ============================================================ SIMD loops (compiled once per ISA)
// The step kernels, written once against Simd<T>.
//
// Per row of H hidden units, one vector of W units at a time (a, b: activation and its input):
//   forward:  i, f, o = sigmoid(a), g = tanh(a); c = f c_prev + i g; h = o tanh(c); the gate rows
//             keep the activations for the backward.
//   backward: dh = dh_out + dh_rec; tc = tanh(c)    (recomputed: cheaper than storing it)
//             dc_t = dc + dh o (1 - tc^2);  dc_prev = dc_t f
//             di = dc_t g i (1 - i), df = dc_t c_prev f (1 - f), dg = dc_t i (1 - g^2),
//             do = dh tc o (1 - o)           written over the activations.
// A row's last H mod W units go through the same vector code on zero-padded copies, so every unit
// gets the same rounding.
namespace nnk {
namespace NNK_ISA_NS {

template <class T>
struct LstmLoops {
  using S = Simd<T>;
  using V = typename S::V;
  static constexpr int W = S::W;

  // Pointers of W units of one row: the four gate blocks, then the per-unit state.
  struct Units {
    T *i, *f, *g, *o;
    const T* cp;
    T* c;
    T* h;                      // forward
    const T *dh_out, *dh_rec;  // backward (null: zero)
    T* dc;                     // backward
  };

  static NNK_INLINE void forward_units(const Units& u) {
    const V i = vsigmoid<T>(S::load(u.i)), f = vsigmoid<T>(S::load(u.f));
    const V g = vtanh<T>(S::load(u.g)), o = vsigmoid<T>(S::load(u.o));
    const V c = S::fma(f, S::load(u.cp), S::mul(i, g));
    S::store(u.i, i);
    S::store(u.f, f);
    S::store(u.g, g);
    S::store(u.o, o);
    S::store(u.c, c);
    S::store(u.h, S::mul(o, vtanh<T>(c)));
  }

  static NNK_INLINE void backward_units(const Units& u) {
    const V one = S::set1(T(1));
    const V i = S::load(u.i), f = S::load(u.f), g = S::load(u.g), o = S::load(u.o);
    V dh = u.dh_rec ? S::load(u.dh_rec) : S::zero();
    if (u.dh_out) dh = S::add(dh, S::load(u.dh_out));
    const V tc = vtanh<T>(S::load(u.c));
    const V dct = S::fma(S::mul(dh, o), S::sub(one, S::mul(tc, tc)), S::load(u.dc));
    S::store(u.dc, S::mul(dct, f));
    S::store(u.i, S::mul(S::mul(dct, g), S::mul(i, S::sub(one, i))));
    S::store(u.f, S::mul(S::mul(dct, S::load(u.cp)), S::mul(f, S::sub(one, f))));
    S::store(u.g, S::mul(S::mul(dct, i), S::sub(one, S::mul(g, g))));
    S::store(u.o, S::mul(S::mul(dh, tc), S::mul(o, S::sub(one, o))));
  }

  // Runs `units` over row b of the step: full vectors in place, the tail on padded copies.
  template <bool Fwd>
  static void row(const LstmStep<T>& s, int64_t b) {
    const int64_t H = s.H;
    T* gr = s.gates + b * 4 * H;
    Units u;
    auto at = [&](int64_t j) {
      u.i = gr + j;
      u.f = gr + H + j;
      u.g = gr + 2 * H + j;
      u.o = gr + 3 * H + j;
      u.cp = s.c_prev + b * s.ldcp + j;
      u.c = s.c + b * H + j;
      u.h = Fwd ? s.h + b * s.ldh + j : nullptr;
      u.dh_out = !Fwd && s.dh_out ? s.dh_out + b * s.lddh + j : nullptr;
      u.dh_rec = !Fwd && s.dh_rec ? s.dh_rec + b * H + j : nullptr;
      u.dc = Fwd ? nullptr : s.dc + b * H + j;
    };
    int64_t j = 0;
    for (; j + W <= H; j += W) {
      at(j);
      Fwd ? forward_units(u) : backward_units(u);
    }
    const int64_t n = H - j;
    if (n == 0) return;
    at(j);
    // Padded copies: gates 0-3, cp 4, c 5, h 6, dh_out 7, dh_rec 8, dc 9.
    alignas(64) T buf[10][W] = {};
    const T* src[10] = {u.i, u.f, u.g, u.o, u.cp, u.c, u.h, u.dh_out, u.dh_rec, u.dc};
    for (int k = 0; k < 10; ++k)
      if (src[k])
        for (int64_t j = 0; j < n; ++j) buf[k][j] = src[k][j];
    Units p{buf[0],
            buf[1],
            buf[2],
            buf[3],
            buf[4],
            buf[5],
            buf[6],
            u.dh_out ? buf[7] : nullptr,
            u.dh_rec ? buf[8] : nullptr,
            buf[9]};
    Fwd ? forward_units(p) : backward_units(p);
    T* dst[10] = {u.i, u.f, u.g, u.o, nullptr, Fwd ? u.c : nullptr, u.h, nullptr, nullptr, u.dc};
    for (int k = 0; k < 10; ++k)
      if (dst[k])
        for (int64_t j = 0; j < n; ++j) dst[k][j] = buf[k][j];
  }

  static void forward_rows(const LstmStep<T>& s, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) row<true>(s, b);
  }
  static void backward_rows(const LstmStep<T>& s, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) row<false>(s, b);
  }

  static constexpr cpu::LstmKernels<T> table() { return {&forward_rows, &backward_rows}; }
};

NNK_ISA_TABLE(lstm_kernels, cpu::LstmKernels, LstmLoops)

}  // namespace NNK_ISA_NS
}  // namespace nnk

// ======================================================================== driver (compiled once)
#if NNK_BASELINE_PASS
#include "common/isa.h"
#include "common/lstm_driver.h"
#include "common/threading.h"
#include "common/workspace.h"
#include "cpu/gemm.h"
#include "cpu/reduce.h"

namespace nnk {
NNK_PER_ISA(template <class T> const cpu::LstmKernels<T>& lstm_kernels())
}  // namespace nnk

namespace nnk {
namespace cpu {

namespace {

// A block of batch rows is at least this many rows: fewer make the step GEMM's tiles too short to
// pay for a thread of their own (the GEMM then splits each step's columns instead).
constexpr int64_t kMinBlockRows = 8;

template <class T>
struct CpuBackend {
  const LstmKernels<T>& k = NNK_ISA_CALL(lstm_kernels<T>());
  // alone: this backend runs one block of rows on the calling thread (inside row_blocks), its
  // GEMMs single-threaded in `ws`.
  bool alone = false;
  T* ws = nullptr;

  void gemm(const Gemm<T>& g) { alone ? cpu::gemm(g, 1, ws) : cpu::gemm(g); }

  const T* pack_b(int64_t K, int64_t N, const T* B, int64_t rsb, int64_t csb) {
    T* dst = thread_scratch<T>(Scratch::lstm_weight, gemm_packed_b_size<T>(K, N));
    gemm_pack_b(K, N, B, rsb, csb, dst);
    return dst;
  }

  // A step is ~10 flops and a few transcendentals per unit: split rows so each thread gets at
  // least ~16K units (a fork costs a few microseconds).
  template <class F>
  void rows(const LstmStep<T>& s, F fn) {
    if (alone) return fn(s, 0, s.B);
    const int64_t grain = s.H >= 16384 ? 1 : 16384 / s.H;
    parallel_for(s.B, grain, [&](int64_t b0, int64_t b1) { fn(s, b0, b1); });
  }
  void step_forward(const LstmStep<T>& s) { rows(s, k.forward_rows); }
  void step_backward(const LstmStep<T>& s) { rows(s, k.backward_rows); }

  // One block of rows per thread, each through the whole sequence: one fork for the layer
  // instead of one or two per step. Interleaved A/B, 2 threads, Zen 4, torch/ours, per step ->
  // per layer: LSTM(200, 200) x 2 at T = 35, B = 20 forward 1.04-1.08 -> 1.14-1.15, fwd+bwd
  // 0.98-0.99 -> 1.01-1.03; LSTM(8, 128) at T = 28, B = 64 forward 0.83-0.90 -> 1.00-1.02.
  template <class F>
  void row_blocks(int64_t B, const Gemm<T>& rec, F&& fn) {
    int64_t nb = num_threads();
    if (B / kMinBlockRows < nb) nb = B / kMinBlockRows;
    if (nb <= 1) return fn(0, B, *this);
    Gemm<T> g = rec;
    g.M = (B + nb - 1) / nb;  // the largest block's workspace serves every block
    const size_t per = gemm_workspace(g, 1);
    T* ws_all = per ? thread_scratch<T>(Scratch::gemm, per * size_t(nb)) : nullptr;
    parallel_for(
        nb, 1,
        [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            int64_t b0, b1;
            split_range(B, int(nb), int(i), &b0, &b1);
            CpuBackend one{k, true, ws_all ? ws_all + per * size_t(i) : nullptr};
            fn(b0, b1, one);
          }
        },
        int(nb));
  }

  void sum_rows(int64_t R, int64_t N, const T* x, int64_t rsx, int64_t csx, T* out) {
    cpu::sum_rows(R, N, x, rsx, csx, out, int64_t(1));
  }
};

}  // namespace

template <class T>
void lstm_layer_forward(const LstmLayer<T>& a) {
  CpuBackend<T> be;
  nnk::lstm_layer_forward(a, be);
}

template <class T>
void lstm_layer_backward(const LstmLayer<T>& a) {
  CpuBackend<T> be;
  nnk::lstm_layer_backward(a, be);
}

template void lstm_layer_forward<float>(const LstmLayer<float>&);
template void lstm_layer_forward<double>(const LstmLayer<double>&);
template void lstm_layer_backward<float>(const LstmLayer<float>&);
template void lstm_layer_backward<double>(const LstmLayer<double>&);

}  // namespace cpu
}  // namespace nnk
#endif  // NNK_BASELINE_PASS
