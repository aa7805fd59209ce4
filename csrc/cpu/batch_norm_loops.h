// Batch-norm inner loops (the BatchNormKernels table of batch_norm_kernel.h), written once against
// Simd<T> (common/simd.h) and compiled once per ISA. Include after simd.h in a
// batch_norm_<isa>.cpp; everything lands in nnk::<isa>.
//
// All loops are memory-bound: the point is one load per input vector, no gathers, no per-element
// index arithmetic, and enough independent accumulators to keep the loads in flight.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/batch_norm_kernel.h"

namespace nnk {
namespace NNK_ISA_NS {

template <class T>
struct BatchNormLoops {
  using S = Simd<T>;
  using V = typename S::V;
  static constexpr int W = S::W;
  // Pixel sums accumulate in T over at most kMaxBlock pixels, then flush to float64.
  static constexpr int64_t kMaxBlock = 256;

  static NNK_INLINE double total(V v) {
    alignas(64) T lanes[W];
    S::store(lanes, v);
    double s = 0;
    for (int l = 0; l < W; ++l) s += double(lanes[l]);
    return s;
  }

  // lanes of v added to out[0..W) in float64
  static NNK_INLINE void flush(V v, double* out) {
    alignas(64) T lanes[W];
    S::store(lanes, v);
    for (int l = 0; l < W; ++l) out[l] += double(lanes[l]);
  }

  static NNK_INLINE bool aligned(const T* p) {
    return (reinterpret_cast<uintptr_t>(p) % sizeof(V)) == 0;
  }

  // Software prefetch kPrefetchBytes ahead of the 2W values at p, for the streams read from
  // memory while other streams are stored or re-read from cache (the hardware prefetcher alone
  // fell behind: Zen 3, fused forward 1.3x -> 1.2x the time of one read + write pass).
  static constexpr int kPrefetchBytes = 1024;
  static NNK_INLINE void prefetch_ahead(const T* p) {
    const char* q = reinterpret_cast<const char*>(p) + kPrefetchBytes;
#pragma GCC unroll 4
    for (int b = 0; b < 2 * W * int(sizeof(T)); b += 64) __builtin_prefetch(q + b, 0, 3);
  }

  // ------------------------------------------------------------------------------------ rows

  // s1 += sum (u - su), s2 += sum (u - su) * (v - sv) along a row (u and v may be one array:
  // no __restrict on them). Four accumulators per sum keep four loads in flight.
  static void pair_sums(const T* u, T su, const T* v, T sv, int64_t n, double* s1, double* s2) {
    const V hu = S::set1(su), hv = S::set1(sv);
    V a[4] = {S::zero(), S::zero(), S::zero(), S::zero()};
    V q[4] = {S::zero(), S::zero(), S::zero(), S::zero()};
    int64_t i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const V d = S::sub(S::load(u + i + k * W), hu);
        a[k] = S::add(a[k], d);
        q[k] = S::fma(d, S::sub(S::load(v + i + k * W), hv), q[k]);
      }
    }
    for (; i + W <= n; i += W) {
      const V d = S::sub(S::load(u + i), hu);
      a[0] = S::add(a[0], d);
      q[0] = S::fma(d, S::sub(S::load(v + i), hv), q[0]);
    }
    double t1 = total(S::add(S::add(a[0], a[1]), S::add(a[2], a[3])));
    double t2 = total(S::add(S::add(q[0], q[1]), S::add(q[2], q[3])));
    for (; i < n; ++i) {
      const T d = u[i] - su;
      t1 += double(d);
      t2 += double(d * (v[i] - sv));
    }
    *s1 += t1;
    *s2 += t2;
  }

  static void row_sums(const T* x, int64_t n, T shift, double* s1, double* s2) {
    pair_sums(x, shift, x, shift, n, s1, s2);
  }

  static void row_grad_sums(const T* dy, const T* x, int64_t n, T mean, double* s1, double* s2) {
    pair_sums(dy, T(0), x, mean, n, s1, s2);
  }

  // The elementwise row passes, optionally fused with the sums of the next channel's row (kNext):
  // one loop whose loads from memory (the next row) overlap its non-temporal stores (this row).
  struct NextSums {
    V a0 = S::zero(), a1 = S::zero(), q0 = S::zero(), q1 = S::zero();
    double t1 = 0, t2 = 0;                         // scalar head and tail
    NNK_INLINE void add(V d0, V d1, V w0, V w1) {  // a += d, q += d * w
      a0 = S::add(a0, d0);
      a1 = S::add(a1, d1);
      q0 = S::fma(d0, w0, q0);
      q1 = S::fma(d1, w1, q1);
    }
    NNK_INLINE void add(T d, T w) {
      t1 += double(d);
      t2 += double(d * w);
    }
    NNK_INLINE void to(double* s1, double* s2) const {
      *s1 += total(S::add(a0, a1)) + t1;
      *s2 += total(S::add(q0, q1)) + t2;
    }
  };

  template <bool kStream>
  static NNK_INLINE void put(T* p, V v) {
    if (kStream)
      S::stream(p, v);
    else
      S::store(p, v);
  }

  // fn(std::bool_constant<a>{}, std::bool_constant<b>{}) for runtime flags a, b.
  template <class F>
  static NNK_INLINE void with_flags(bool a, bool b, F&& fn) {
    if (a && b)
      fn(std::true_type{}, std::true_type{});
    else if (a)
      fn(std::true_type{}, std::false_type{});
    else if (b)
      fn(std::false_type{}, std::true_type{});
    else
      fn(std::false_type{}, std::false_type{});
  }

  // The skeleton of both elementwise row passes: out[i] = op.one(i), W values at a time from
  // op.vec(i); kStream: non-temporal stores after a scalar head up to alignment; kNext: the sums
  // of the next channel's row over the same i (op.next_one / op.next_vec, prefetched ahead).
  template <bool kStream, bool kNext, class Op>
  static NNK_INLINE void row_pass(T* __restrict out, int64_t n, const Op& op, double* ns1,
                                  double* ns2) {
    NextSums next;
    int64_t i = 0;
    if (kStream)
      for (; i < n && !aligned(out + i); ++i) {
        out[i] = op.one(i);
        if (kNext) op.next_one(next, i);
      }
    for (; i + 2 * W <= n; i += 2 * W) {
      const V r0 = op.vec(i), r1 = op.vec(i + W);
      put<kStream>(out + i, r0);
      put<kStream>(out + i + W, r1);
      if (kNext) op.next_vec(next, i);
    }
    for (; i < n; ++i) {
      out[i] = op.one(i);
      if (kNext) op.next_one(next, i);
    }
    if (kNext) next.to(ns1, ns2);
  }

  // y = (x - center) * scale + shift; next: sums of nx - nshift and its squares.
  struct AffineOp {
    const T* __restrict x;
    T center, scale, shift;
    const T* __restrict nx;
    T nshift;
    V c, a, o, h;
    NNK_INLINE T one(int64_t i) const { return (x[i] - center) * scale + shift; }
    NNK_INLINE V vec(int64_t i) const { return S::fma(S::sub(S::load(x + i), c), a, o); }
    NNK_INLINE void next_one(NextSums& s, int64_t i) const {
      s.add(nx[i] - nshift, nx[i] - nshift);
    }
    NNK_INLINE void next_vec(NextSums& s, int64_t i) const {
      prefetch_ahead(nx + i);
      const V d0 = S::sub(S::load(nx + i), h), d1 = S::sub(S::load(nx + i + W), h);
      s.add(d0, d1, d0, d1);
    }
  };

  static void row_affine(const T* x, T* y, int64_t n, T center, T scale, T shift, bool stream,
                         const T* nx, T nshift, double* ns1, double* ns2) {
    const AffineOp op{x,      center,          scale,          shift,          nx,
                      nshift, S::set1(center), S::set1(scale), S::set1(shift), S::set1(nshift)};
    with_flags(stream, nx != nullptr, [&](auto st, auto nt) {
      row_pass<decltype(st)::value, decltype(nt)::value>(y, n, op, ns1, ns2);
    });
  }

  // (dy - k0 - (x - mean) * k1) * k2
  static NNK_INLINE V grad_of(V g, V xv, V m, V k0, V k1, V k2) {
    return S::mul(S::sub(S::sub(g, k0), S::mul(S::sub(xv, m), k1)), k2);
  }

  // dx = (dy - k0 - (x - mean) * k1) * k2; next: sums of ndy and ndy * (nx - nmean).
  struct GradOp {
    const T* __restrict dy;
    const T* __restrict x;
    T mean, k0, k1, k2;
    const T* __restrict ndy;
    const T* __restrict nx;
    T nmean;
    V m, a0, a1, a2, nm;
    NNK_INLINE T one(int64_t i) const { return (dy[i] - k0 - (x[i] - mean) * k1) * k2; }
    NNK_INLINE V vec(int64_t i) const {
      return grad_of(S::load(dy + i), S::load(x + i), m, a0, a1, a2);
    }
    NNK_INLINE void next_one(NextSums& s, int64_t i) const { s.add(ndy[i], nx[i] - nmean); }
    NNK_INLINE void next_vec(NextSums& s, int64_t i) const {
      prefetch_ahead(ndy + i);
      prefetch_ahead(nx + i);
      s.add(S::load(ndy + i), S::load(ndy + i + W), S::sub(S::load(nx + i), nm),
            S::sub(S::load(nx + i + W), nm));
    }
  };

  static void row_grad(const T* dy, const T* x, T* dx, int64_t n, T mean, T k0, T k1, T k2,
                       bool stream, const T* ndy, const T* nx, T nmean, double* ns1, double* ns2) {
    const GradOp op{
        dy, x,     mean,          k0,          k1,          k2,          ndy,
        nx, nmean, S::set1(mean), S::set1(k0), S::set1(k1), S::set1(k2), S::set1(nmean)};
    with_flags(stream, nx != nullptr, [&](auto st, auto nt) {
      row_pass<decltype(st)::value, decltype(nt)::value>(dx, n, op, ns1, ns2);
    });
  }

  // ---------------------------------------------------------------------------------- pixels
  // Sums: pixel after pixel (memory order: the hardware prefetcher sees one stream), each adding
  // its C values into per-channel T accumulators that stay in L1 (2C values), flushed to float64
  // every kMaxBlock pixels. (Blocking channels into registers instead walks memory with a stride
  // of one pixel and ran at half the bandwidth.)

  // a[c] += d, q[c] += d * e for the C values of one pixel, d = u - su, e = v - sv.
  static NNK_INLINE void pixel_add(const T* __restrict u, const T* __restrict su,
                                   const T* __restrict v, const T* __restrict sv, int64_t C,
                                   T* __restrict a, T* __restrict q) {
    int64_t c = 0;
    for (; c + W <= C; c += W) {
      const V d = su ? S::sub(S::load(u + c), S::load(su + c)) : S::load(u + c);
      const V e = sv ? S::sub(S::load(v + c), S::load(sv + c)) : S::load(v + c);
      S::store(a + c, S::add(S::load(a + c), d));
      S::store(q + c, S::fma(d, e, S::load(q + c)));
    }
    for (; c < C; ++c) {
      const T d = su ? u[c] - su[c] : u[c];
      const T e = sv ? v[c] - sv[c] : v[c];
      a[c] += d;
      q[c] += d * e;
    }
  }

  // s1[c] += sum_p (u[p][c] - su[c]), s2[c] += sum_p (u[p][c] - su[c]) * (v[p][c] - sv[c])
  // (su, sv nullable: 0).
  static void pixel_sums(const T* u, int64_t ldu, const T* su, const T* v, int64_t ldv, const T* sv,
                         int64_t P, int64_t C, double* s1, double* s2) {
    std::vector<T> acc(size_t(2 * C));
    T* a = acc.data();
    T* q = a + C;
    for (int64_t p0 = 0; p0 < P; p0 += kMaxBlock) {
      const int64_t pe = std::min(P, p0 + kMaxBlock);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t p = p0; p < pe; ++p) pixel_add(u + p * ldu, su, v + p * ldv, sv, C, a, q);
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += double(a[c]);
        s2[c] += double(q[c]);
      }
    }
  }

  static void pix_sums(const T* x, int64_t ldx, int64_t P, int64_t C, const T* shift, double* s1,
                       double* s2) {
    pixel_sums(x, ldx, shift, x, ldx, shift, P, C, s1, s2);
  }

  static void pix_grad_sums(const T* dy, int64_t lddy, const T* x, int64_t ldx, int64_t P,
                            int64_t C, const T* mean, double* s1, double* s2) {
    pixel_sums(dy, lddy, nullptr, x, ldx, mean, P, C, s1, s2);
  }

  // Elementwise: pixel by pixel, the coefficients re-read from L1. Non-temporal stores when asked
  // and every pixel's vectors are aligned (aligned base, ld a multiple of the vector).
  static bool stream_rows(bool stream, const T* y, int64_t ldy) {
    return stream && aligned(y) && (ldy * int64_t(sizeof(T))) % int64_t(sizeof(V)) == 0;
  }

  template <bool kStream>
  static void pix_affine_impl(const T* __restrict x, int64_t ldx, T* __restrict y, int64_t ldy,
                              int64_t P, int64_t C, const T* __restrict center,
                              const T* __restrict scale, const T* __restrict shift) {
    for (int64_t p = 0; p < P; ++p) {
      const T* r = x + p * ldx;
      T* o = y + p * ldy;
      int64_t c = 0;
      for (; c + W <= C; c += W)
        put<kStream>(o + c, S::fma(S::sub(S::load(r + c), S::load(center + c)), S::load(scale + c),
                                   S::load(shift + c)));
      for (; c < C; ++c) o[c] = (r[c] - center[c]) * scale[c] + shift[c];
    }
  }

  static void pix_affine(const T* x, int64_t ldx, T* y, int64_t ldy, int64_t P, int64_t C,
                         const T* center, const T* scale, const T* shift, bool stream) {
    if (stream_rows(stream, y, ldy))
      pix_affine_impl<true>(x, ldx, y, ldy, P, C, center, scale, shift);
    else
      pix_affine_impl<false>(x, ldx, y, ldy, P, C, center, scale, shift);
  }

  template <bool kStream>
  static void pix_grad_impl(const T* __restrict dy, int64_t lddy, const T* __restrict x,
                            int64_t ldx, T* __restrict dx, int64_t lddx, int64_t P, int64_t C,
                            const T* __restrict mean, const T* __restrict k0,
                            const T* __restrict k1, const T* __restrict k2) {
    for (int64_t p = 0; p < P; ++p) {
      const T* g = dy + p * lddy;
      const T* r = x + p * ldx;
      T* o = dx + p * lddx;
      int64_t c = 0;
      for (; c + W <= C; c += W)
        put<kStream>(o + c, grad_of(S::load(g + c), S::load(r + c), S::load(mean + c),
                                    S::load(k0 + c), S::load(k1 + c), S::load(k2 + c)));
      for (; c < C; ++c) o[c] = (g[c] - k0[c] - (r[c] - mean[c]) * k1[c]) * k2[c];
    }
  }

  static void pix_grad(const T* dy, int64_t lddy, const T* x, int64_t ldx, T* dx, int64_t lddx,
                       int64_t P, int64_t C, const T* mean, const T* k0, const T* k1, const T* k2,
                       bool stream) {
    if (stream_rows(stream, dx, lddx))
      pix_grad_impl<true>(dy, lddy, x, ldx, dx, lddx, P, C, mean, k0, k1, k2);
    else
      pix_grad_impl<false>(dy, lddy, x, ldx, dx, lddx, P, C, mean, k0, k1, k2);
  }

  static constexpr cpu::BatchNormKernels<T> table() {
    return {row_sums, row_grad_sums, row_affine, row_grad,
            pix_sums, pix_grad_sums, pix_affine, pix_grad};
  }
};

}  // namespace NNK_ISA_NS
}  // namespace nnk
