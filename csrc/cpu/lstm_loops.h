// LSTM step kernels (the LstmKernels table of lstm_kernel.h), written once against Simd<T> and
// compiled once per ISA. Include after simd.h in an lstm_<isa>.cpp.
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
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/simd_math.h"
#include "cpu/lstm_kernel.h"

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
      if (src[k]) std::copy(src[k], src[k] + n, buf[k]);
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
      if (dst[k]) std::copy(buf[k], buf[k] + n, dst[k]);
  }

  static void forward_rows(const LstmStep<T>& s, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) row<true>(s, b);
  }
  static void backward_rows(const LstmStep<T>& s, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) row<false>(s, b);
  }

  static constexpr cpu::LstmKernels<T> table() { return {&forward_rows, &backward_rows}; }
};

}  // namespace NNK_ISA_NS
}  // namespace nnk
