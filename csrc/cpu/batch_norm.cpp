// Batch normalization: per-channel statistics, normalisation and their gradients over an (N, C, S)
// view of the input (common/tensor.h, View3; S = the flattened spatial dims: 1 for (N, C), L, or
// H*W). The CUDA backend (cuda/batch_norm.cu) computes the same passes.
//
//   training forward   mean, var = stats of x[:, c, :];  y = (x - mean) * invstd * w + b
//   eval forward       y = (x - running_mean) * invstd * w + b
// Every normalisation is applied as (x - mean[c]) * scale[c] + shift[c]: x - mean is exact for
// values near the mean, whereas the fused form x * scale + (shift - mean * scale) cancels two
// large terms (mean 1e4, std 0.01: outputs quantised to 1/16 in float32).
//   backward           dx = (dy - mean(dy) - xhat * mean(dy * xhat)) * invstd * w   (training)
//                      dx = dy * invstd * w                                         (eval)
//                      dw = sum dy * xhat,  db = sum dy
//
// Statistics are single-pass shifted sums: each channel subtracts its first element before
// summing x and x^2 (in float64 across rows), so a channel with mean 1e4 and std 0.01 loses no
// precision, and per-thread partials add exactly. The fused training passes process one channel
// at a time where the layout allows (NCHW: the channel's values are reused from cache between the
// statistics and the normalisation); channels_last and (N, C) inputs vectorise across channels.
// The pieces are also exported one by one for SyncBatchNorm, which combines statistics across
// processes between them.
//
// On the CPU, two parts: the SIMD inner loops (the BatchNormKernels table), compiled once per ISA,
// and the driver (threading, statistics and the choice of loop order), compiled once.
//
// Views are first normalised: with S == 1 ((N, C) inputs) the batch dim becomes the spatial one
// (N' = 1, S' = N, ss' = sn). Then one of three layouts, for all operands of a call together:
//   rows     every operand has ss == 1 (NCHW, (N, C, L)): a channel is N unit-stride rows of S.
//            With enough channels, each thread takes whole channels and runs the statistics (or
//            the gradient sums) and then the elementwise pass on one channel before the next: the
//            second pass reads the channel from cache, two passes over memory fused into one.
//            With few channels, rows are cut into pieces and split across threads instead.
//   pixels   every operand has sc == 1 (channels_last, (N, C)): pixels of C contiguous values;
//            threads take ranges of pixels and vectorise across channels.
//   strided  anything else (non-contiguous views): plain loops, one channel per iteration.
// Partial sums are float64 per thread and added in thread order, so results depend on the thread
// count only through float64 rounding. Outputs larger than the last-level cache are written with
// non-temporal stores (no read-for-ownership of lines that are overwritten whole).
//
// Row loops take n unit-stride values of one channel (a row of the (N, C, S) view, S = H*W).
// Pixel loops take P pixels of C unit-stride channel values each, pixel p at x + p*ldx
// (channels_last and (N, C) inputs); per-channel coefficients are arrays of C.
// Sums accumulate in T vector lanes and are returned in float64; the pixel loops flush their lanes
// to float64 at least every 256 pixels, so no lane sums more than a few hundred values.
#include <cstdint>
#include <type_traits>

#include "common/simd.h"
#include "common/tensor.h"

namespace nnk {
namespace cpu {

template <class T>
struct BatchNormKernels {
  // s1 += sum (x - shift), s2 += sum (x - shift)^2
  void (*row_sums)(const T* x, int64_t n, T shift, double* s1, double* s2);
  // s1 += sum dy, s2 += sum dy * (x - mean)
  void (*row_grad_sums)(const T* dy, const T* x, int64_t n, T mean, double* s1, double* s2);
  // y = (x - center) * scale + shift; stream: non-temporal stores (no read of y's lines).
  // nx (nullable): meanwhile the row_sums of n values at nx (the next channel's row) into
  // ns1, ns2 with shift nshift: its loads from memory overlap this row's stores.
  void (*row_affine)(const T* x, T* y, int64_t n, T center, T scale, T shift, bool stream,
                     const T* nx, T nshift, double* ns1, double* ns2);
  // dx = (dy - k0 - (x - mean) * k1) * k2; ndy, nx (nullable): meanwhile the row_grad_sums of
  // n values at ndy, nx with mean nmean into ns1, ns2.
  void (*row_grad)(const T* dy, const T* x, T* dx, int64_t n, T mean, T k0, T k1, T k2, bool stream,
                   const T* ndy, const T* nx, T nmean, double* ns1, double* ns2);

  // s1[c] += sum_p (x[p][c] - shift[c]), s2[c] += sum_p (x[p][c] - shift[c])^2
  void (*pix_sums)(const T* x, int64_t ldx, int64_t P, int64_t C, const T* shift, double* s1,
                   double* s2);
  // s1[c] += sum_p dy[p][c], s2[c] += sum_p dy[p][c] * (x[p][c] - mean[c])
  void (*pix_grad_sums)(const T* dy, int64_t lddy, const T* x, int64_t ldx, int64_t P, int64_t C,
                        const T* mean, double* s1, double* s2);
  // y[p][c] = (x[p][c] - center[c]) * scale[c] + shift[c]; stream as in row_affine (taken only
  // where every pixel's vectors are aligned)
  void (*pix_affine)(const T* x, int64_t ldx, T* y, int64_t ldy, int64_t P, int64_t C,
                     const T* center, const T* scale, const T* shift, bool stream);
  // dx[p][c] = (dy[p][c] - k0[c] - (x[p][c] - mean[c]) * k1[c]) * k2[c]
  void (*pix_grad)(const T* dy, int64_t lddy, const T* x, int64_t ldx, T* dx, int64_t lddx,
                   int64_t P, int64_t C, const T* mean, const T* k0, const T* k1, const T* k2,
                   bool stream);
};

}  // namespace cpu
}  // namespace nnk

// ============================================================ SIMD loops (compiled once per ISA)
// All loops are memory-bound: the point is one load per input vector, no gathers, no per-element
// index arithmetic, and enough independent accumulators to keep the loads in flight.
namespace nnk {
namespace NNK_ISA_NS {

template <class T>
struct BatchNormLoops {
  using S = Simd<T>;
  using V = typename S::V;
  static constexpr int W = S::W;
  // Pixel sums accumulate in T over at most kMaxBlock pixels, then flush to float64.
  static constexpr int64_t kMaxBlock = 256;

  // The lanes of v added in float64 (a tree of widened halves: a row of 49 or 64 values, as in
  // ResNet's 7x7 and the course CNN's 8x8 maps, ran its two lane-by-lane totals longer than its
  // arithmetic).
  static NNK_INLINE double total(V v) { return S::reduce_add_f64(v); }

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
    NNK_INLINE void add(V d, V w) {  // one vector (a row's last n % 2W values)
      a0 = S::add(a0, d);
      q0 = S::fma(d, w, q0);
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
    if (i + W <= n) {  // one more vector: a row of 49 (7x7) left 17 values to the scalar loop
      put<kStream>(out + i, op.vec(i));
      if (kNext) op.next_vec1(next, i);
      i += W;
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
    NNK_INLINE void next_vec1(NextSums& s, int64_t i) const {
      const V d = S::sub(S::load(nx + i), h);
      s.add(d, d);
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
    NNK_INLINE void next_vec1(NextSums& s, int64_t i) const {
      s.add(S::load(ndy + i), S::sub(S::load(nx + i), nm));
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
    T* a = new T[size_t(2 * C)];  // operator new, not std::vector (see common/simd.h)
    T* q = a + C;
    for (int64_t p0 = 0; p0 < P; p0 += kMaxBlock) {
      const int64_t pe = lo(P, p0 + kMaxBlock);
      for (int64_t c = 0; c < 2 * C; ++c) a[c] = T(0);
      for (int64_t p = p0; p < pe; ++p) pixel_add(u + p * ldu, su, v + p * ldv, sv, C, a, q);
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += double(a[c]);
        s2[c] += double(q[c]);
      }
    }
    delete[] a;
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

NNK_ISA_TABLE(batch_norm_kernels, cpu::BatchNormKernels, BatchNormLoops)

}  // namespace NNK_ISA_NS
}  // namespace nnk

// ======================================================================== driver (compiled once)
#if NNK_BASELINE_PASS
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/isa.h"
#include "common/threading.h"
#include "common/workspace.h"
#include "cpu/gemm.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace nnk {
NNK_PER_ISA(template <class T> const cpu::BatchNormKernels<T>& batch_norm_kernels())
}  // namespace nnk

namespace nnk {
namespace cpu {

namespace {

constexpr int64_t kMinParallel = int64_t(1) << 15;  // elements; below, fork/join would dominate

enum class Layout { rows, pixels, strided };

template <class... Vs>
Layout layout_of(const Vs&... v) {
  if (((v.ss == 1 || v.S == 1) && ...)) return Layout::rows;
  if (((v.sc == 1) && ...)) return Layout::pixels;
  return Layout::strided;
}

template <class T>
inline T* row_of(const View3<T>& v, int64_t n, int64_t c) {
  return v.p + n * v.sn + c * v.sc;
}

template <class T>
inline T* pixel_of(const View3<T>& v, int64_t n, int64_t s) {
  return v.p + n * v.sn + s * v.ss;
}

template <class T>
inline T& at(const View3<T>& v, int64_t n, int64_t c, int64_t s) {
  return v.p[n * v.sn + c * v.sc + s * v.ss];
}

template <class T>
bool stream_output(const View3<T>& y) {
  return y.p && y.N * y.C * y.S * int64_t(sizeof(T)) >= stream_min_bytes();
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

inline int threads_for(int64_t elements) {
  return elements < kMinParallel || in_parallel_region() ? 1 : num_threads();
}

// Runs fn(tid, begin, end) over [0, n) split evenly on `nt` threads (thread ids 0..nt-1).
template <class F>
void split_threads(int64_t n, int nt, F&& fn) {
  if (nt <= 1) {
    fn(0, int64_t(0), n);
    return;
  }
  parallel_for(
      nt, 1,
      [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          int64_t b, e;
          split_range(n, nt, int(t), &b, &e);
          fn(int(t), b, e);
        }
      },
      nt);
}

// Rows cut into pieces so that even one row keeps every thread busy: item i is piece i % K of row
// i / K (rows in memory order n*C + c), each piece `len` long (a multiple of 64).
struct Pieces {
  int64_t rows, S, K, len;
  Pieces(int64_t N, int64_t C, int64_t S_, int nt) : rows(N * C), S(S_) {
    K = rows >= 4 * nt ? 1 : (4 * nt + rows - 1) / std::max<int64_t>(rows, 1);
    len = std::max<int64_t>(64, ((S + K - 1) / K + 63) / 64 * 64);
    K = std::max<int64_t>(1, (S + len - 1) / len);
  }
  int64_t items() const { return rows * K; }
  // fn(n, c, s0, s1) for items [b, e) of an (N, C) grid of rows
  template <class F>
  void each(int64_t C, int64_t b, int64_t e, F&& fn) const {
    for (int64_t i = b; i < e; ++i) {
      const int64_t r = i / K, s0 = (i % K) * len;
      fn(r / C, r % C, s0, std::min(S, s0 + len));
    }
  }
};

// Per-channel float64 sums (two per channel) for every thread, added in thread order.
struct Partials {
  int nt;
  int64_t C;
  std::vector<double> v;  // [thread][2][C]
  Partials(int threads, int64_t channels)
      : nt(threads), C(channels), v(size_t(threads) * 2 * size_t(channels), 0.0) {}
  double* a(int t) { return v.data() + size_t(t) * 2 * C; }
  double* b(int t) { return a(t) + C; }
  void totals(std::vector<double>* x, std::vector<double>* y) const {
    x->assign(size_t(C), 0.0);
    y->assign(size_t(C), 0.0);
    for (int t = 0; t < nt; ++t)
      for (int64_t c = 0; c < C; ++c) {
        (*x)[size_t(c)] += v[size_t(t) * 2 * C + c];
        (*y)[size_t(c)] += v[size_t(t) * 2 * C + C + c];
      }
  }
};

// fn(n, s, P) for the runs of pixels [b, e) of an (N, S) grid of pixels that stay within one n.
template <class F>
void pixel_runs(int64_t S, int64_t b, int64_t e, F&& fn) {
  while (b < e) {
    const int64_t n = b / S, s = b % S, P = std::min(e - b, S - s);
    fn(n, s, P);
    b += P;
  }
}

// The training passes on the pixel layout in one parallel region: each thread reduces its range
// of pixels into per-channel partials, and after one barrier combines them (every thread, in
// thread order: the same totals) and runs the elementwise pass over the same range, which is
// still in its cache when the range fits.
//   reduce(b, e, double* a, double* q)    a[c], q[c] += the sums over pixels [b, e)
//   finish(s1, s2, bool write) -> coefs   per-channel coefficients from the totals; write: store
//                                         the per-channel outputs (exactly one thread does)
//   apply(coefs, b, e)                    the elementwise pass over pixels [b, e)
template <class Reduce, class Finish, class Apply>
void pixel_sweep(int64_t pixels, int64_t C, Reduce&& reduce, Finish&& finish, Apply&& apply) {
  const int nt = threads_for(pixels * C);
  Partials part(nt, C);
  team_run(nt, [&](int tid, int team) {
    int64_t b, e;
    split_range(pixels, team, tid, &b, &e);
    reduce(b, e, part.a(tid), part.b(tid));
    team_barrier(team);
    std::vector<double> s1, s2;
    part.totals(&s1, &s2);
    apply(finish(s1, s2, tid == 0), b, e);
    stream_fence();
  });
}

// ------------------------------------------------------------------------ fused channel sweep
// The training forward and backward are two passes over each channel: a reduction (statistics or
// gradient sums), then an elementwise pass that needs the channel's totals. Done channel by
// channel, the second pass finds the channel in cache; and the elementwise pass of channel c runs
// the reduction of channel c + 1 in the same loop, so that the loads of c + 1 from memory overlap
// the (non-temporal) stores of c: one read and one write stream at once, where separate passes
// would leave the write bandwidth idle while reading and vice versa. Two ways to share the work:
//   by channels    each thread sweeps whole channels of its own, without synchronisation; used
//                  whenever the channels divide well between the threads. (Measured on Zen 3,
//                  32x64x56x56: faster than the cooperative sweep even though a channel's inputs
//                  exceed L2 - a barrier per channel waits for the slowest thread each time.)
//   cooperative    all threads sweep every channel, each its share of the rows, with a barrier per
//                  channel: any channel count splits evenly (C = 1 included).
// Each step walks the rows in the direction opposite to the previous one, so that the elementwise
// pass starts with the rows the reduction read last (still in L2) - the same direction each time
// would re-read the channel in the order it was read, the worst order for an LRU cache.
//
//   reduce(c, n, s0, s1, double* a, double* b)      a, b += the sums over row n, [s0, s1) of c
//   finish(c, a, b, bool write) -> coef             the channel's coefficients; write: store c's
//                                                   per-channel outputs (exactly one thread does)
//   apply(c, coef, n, s0, s1, next, double* a, b)   elementwise over the piece of c, and when
//                                                   next >= 0 the reduction of channel next's
//                                                   same piece into a, b
template <class Reduce, class Finish, class Apply>
void fused_sweep(int64_t N, int64_t C, int64_t S, Reduce&& reduce, Finish&& finish, Apply&& apply) {
  const int nt = threads_for(N * C * S);
  const bool own = nt <= 1 || C % nt == 0 || C >= 4 * nt;
  if (own) {
    parallel_for(
        C, 1,
        [&](int64_t c0, int64_t c1) {
          double a = 0, b = 0;
          for (int64_t n = 0; n < N; ++n) reduce(c0, n, int64_t(0), S, &a, &b);
          for (int64_t c = c0; c < c1; ++c) {
            const auto coef = finish(c, a, b, true);
            a = b = 0;
            const bool down = (c - c0) % 2 == 0;  // against the order c's rows were read in
            for (int64_t j = 0; j < N; ++j)
              apply(c, coef, down ? N - 1 - j : j, int64_t(0), S, c + 1 < c1 ? c + 1 : -1, &a, &b);
          }
          stream_fence();  // the apply passes may store non-temporally
        },
        nt);
    return;
  }
  const Pieces pieces(N, 1, S, nt);
  std::vector<double> part(size_t(nt) * 2 * size_t(C), 0.0);  // [thread][c][2]
  team_run(nt, [&](int tid, int team) {
    int64_t b, e;
    split_range(pieces.items(), team, tid, &b, &e);
    auto mine = [&](int64_t c) { return part.data() + (size_t(tid) * size_t(C) + size_t(c)) * 2; };
    if (C > 0)
      pieces.each(1, b, e, [&](int64_t n, int64_t, int64_t s0, int64_t s1) {
        reduce(int64_t(0), n, s0, s1, mine(0), mine(0) + 1);
      });
    team_barrier(team);
    for (int64_t c = 0; c < C; ++c) {
      double ta = 0, tb = 0;  // every thread adds the partials in the same order: same totals
      for (int t = 0; t < team; ++t) {
        ta += part[(size_t(t) * size_t(C) + size_t(c)) * 2];
        tb += part[(size_t(t) * size_t(C) + size_t(c)) * 2 + 1];
      }
      const auto coef = finish(c, ta, tb, tid == 0);
      const int64_t next = c + 1 < C ? c + 1 : -1;
      double* acc = next >= 0 ? mine(next) : nullptr;
      const bool down = c % 2 == 0;  // against the order c's pieces were read in
      for (int64_t j = b; j < e; ++j) {
        const int64_t i = down ? e - 1 - (j - b) : j;
        const int64_t n = i / pieces.K, s0 = (i % pieces.K) * pieces.len;
        apply(c, coef, n, s0, std::min(S, s0 + pieces.len), next, acc, acc ? acc + 1 : nullptr);
      }
      team_barrier(team);
    }
    stream_fence();
  });
}

// ------------------------------------------------------------------------------- statistics

template <class T>
std::vector<T> first_elements(const View3<const T>& x) {
  std::vector<T> shift(size_t(x.C));
  for (int64_t c = 0; c < x.C; ++c) shift[size_t(c)] = x.N * x.S > 0 ? x.p[c * x.sc] : T(0);
  return shift;
}

// mean and m2 = sum (x - mean)^2 from sums of (x - shift) over `count` values.
inline void finish_stats(double shift, double s1, double s2, double count, double* mean,
                         double* m2) {
  const double d = s1 / count;
  *mean = shift + d;
  *m2 = s2 - s1 * d;
  if (*m2 < 0) *m2 = 0;
}

// ------------------------------------------------------------------------- whole-view passes
// The unfused passes (eval, the pieces SyncBatchNorm combines across processes, the training
// passes of the strided layout), each written once per layout:
//   rows     pieces of rows split evenly across threads: row(n, c, s0, s1, ...)
//   pixels   ranges of pixels split evenly across threads: pix(n, s, P, ...)
//   strided  whole channels per thread, element by element: one(n, c, s, ...)

// Per-channel float64 sums into s1, s2; each callback adds to the per-thread arrays a, q (C each).
template <class Row, class Pix, class One>
void sum_all(Layout layout, int64_t N, int64_t C, int64_t S, Row&& row, Pix&& pix, One&& one,
             std::vector<double>* s1, std::vector<double>* s2) {
  const int nt = threads_for(N * C * S);
  Partials part(nt, C);
  switch (layout) {
    case Layout::rows: {
      const Pieces pc(N, C, S, nt);
      split_threads(pc.items(), nt, [&](int t, int64_t b, int64_t e) {
        pc.each(C, b, e, [&](int64_t n, int64_t c, int64_t s0, int64_t s1_) {
          row(n, c, s0, s1_, part.a(t), part.b(t));
        });
      });
      break;
    }
    case Layout::pixels:
      split_threads(N * S, nt, [&](int t, int64_t b, int64_t e) {
        pixel_runs(S, b, e,
                   [&](int64_t n, int64_t s, int64_t P) { pix(n, s, P, part.a(t), part.b(t)); });
      });
      break;
    case Layout::strided:  // channel c only ever in thread slot 0's column c: no race
      parallel_for(
          C, 1,
          [&](int64_t c0, int64_t c1) {
            for (int64_t c = c0; c < c1; ++c)
              for (int64_t n = 0; n < N; ++n)
                for (int64_t s = 0; s < S; ++s) one(n, c, s, part.a(0), part.b(0));
          },
          nt);
      break;
  }
  part.totals(s1, s2);
}

// An elementwise pass (stream: the callbacks store non-temporally; each thread fences after).
template <class Row, class Pix, class One>
void for_all(Layout layout, int64_t N, int64_t C, int64_t S, bool stream, Row&& row, Pix&& pix,
             One&& one) {
  const int nt = threads_for(N * C * S);
  switch (layout) {
    case Layout::rows: {
      const Pieces pc(N, C, S, nt);
      split_threads(pc.items(), nt, [&](int, int64_t b, int64_t e) {
        pc.each(C, b, e, row);
        if (stream) stream_fence();
      });
      break;
    }
    case Layout::pixels:
      split_threads(N * S, nt, [&](int, int64_t b, int64_t e) {
        pixel_runs(S, b, e, pix);
        if (stream) stream_fence();
      });
      break;
    case Layout::strided:
      parallel_for(
          C, 1,
          [&](int64_t c0, int64_t c1) {
            for (int64_t c = c0; c < c1; ++c)
              for (int64_t n = 0; n < N; ++n)
                for (int64_t s = 0; s < S; ++s) one(n, c, s);
          },
          nt);
      break;
  }
}

// s1[c] = sum (x - shift[c]), s2[c] = sum (x - shift[c])^2.
template <class T>
void channel_sums(const View3<const T>& x, const T* shift, std::vector<double>* s1,
                  std::vector<double>* s2) {
  const BatchNormKernels<T>& k = NNK_ISA_CALL(batch_norm_kernels<T>());
  sum_all(
      layout_of(x), x.N, x.C, x.S,
      [&](int64_t n, int64_t c, int64_t s0, int64_t s1_, double* a, double* q) {
        k.row_sums(row_of(x, n, c) + s0, s1_ - s0, shift[c], a + c, q + c);
      },
      [&](int64_t n, int64_t s, int64_t P, double* a, double* q) {
        k.pix_sums(pixel_of(x, n, s), x.ss, P, x.C, shift, a, q);
      },
      [&](int64_t n, int64_t c, int64_t s, double* a, double* q) {
        const double d = double(at(x, n, c, s) - shift[c]);
        a[c] += d;
        q[c] += d * d;
      },
      s1, s2);
}

// Rows shorter than this (MobileNetV2's 4x4 and 2x2 layers) cost more in per-row work than in
// arithmetic: an image's channels are then one run of C*S values (short_rows), in eval and in
// the training passes. Training forward + backward, torch/ours on the 2-vCPU Xeon, 1 / 2 threads:
// 8 x 960 x 2x2 0.82 / 0.61 -> 1.97 / 1.46, 8 x 384 x 4x4 0.54 / 0.58 -> 0.82 / 0.68.
constexpr int64_t kShortRow = 32;

// Short contiguous rows: every view has 1 < S < kShortRow, ss == 1 and sc == S, so image n is
// one "pixel" of C*S values (sn apart), and a per-channel array becomes C*S values (repeat);
// per-column sums of those pixels fold back into channels (fold, in column order). The training
// passes need kShortRowImages images or more: each thread builds C*S-long partials and
// coefficients, which with 2 images cost more than the data (960 x 7x7: 0.30x torch).
constexpr int64_t kShortRowImages = 4;
template <class... Vs>
bool short_rows(const Vs&... v) {
  return ((v.S < kShortRow && v.S > 1 && v.ss == 1 && v.sc == v.S) && ...);
}

template <class T>
std::vector<T> repeat(const T* a, int64_t C, int64_t S) {
  std::vector<T> r(size_t(C * S));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < S; ++i) r[size_t(c * S + i)] = a[c];
  return r;
}

inline std::vector<double> fold(const std::vector<double>& cols, int64_t C, int64_t S) {
  std::vector<double> r(size_t(C), 0.0);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < S; ++i) r[size_t(c)] += cols[size_t(c * S + i)];
  return r;
}

// y = (x - center[c]) * scale[c] + shift[c] over the whole view.
template <class T>
void apply_all(const View3<const T>& x, const View3<T>& y, const T* center, const T* scale,
               const T* shift) {
  const BatchNormKernels<T>& k = NNK_ISA_CALL(batch_norm_kernels<T>());
  const bool stream = stream_output(y);
  if (short_rows(x, y)) {
    const int64_t CS = x.C * x.S;
    const std::vector<T> rc = repeat(center, x.C, x.S), rs = repeat(scale, x.C, x.S),
                         rh = repeat(shift, x.C, x.S);
    split_threads(x.N, threads_for(x.N * CS), [&](int, int64_t b, int64_t e) {
      k.pix_affine(x.p + b * x.sn, x.sn, y.p + b * y.sn, y.sn, e - b, CS, rc.data(), rs.data(),
                   rh.data(), stream);
      if (stream) stream_fence();
    });
    return;
  }
  for_all(
      layout_of(x, y), x.N, x.C, x.S, stream,
      [&](int64_t n, int64_t c, int64_t s0, int64_t s1) {
        k.row_affine(row_of(x, n, c) + s0, row_of(y, n, c) + s0, s1 - s0, center[c], scale[c],
                     shift[c], stream, nullptr, T(0), nullptr, nullptr);
      },
      [&](int64_t n, int64_t s, int64_t P) {
        k.pix_affine(pixel_of(x, n, s), x.ss, pixel_of(y, n, s), y.ss, P, x.C, center, scale, shift,
                     stream);
      },
      [&](int64_t n, int64_t c, int64_t s) {
        at(y, n, c, s) = (at(x, n, c, s) - center[c]) * scale[c] + shift[c];
      });
}

// s1[c] = sum dy, s2[c] = sum dy * (x - mean[c]).
template <class T>
void grad_sums(const View3<const T>& dy, const View3<const T>& x, const T* mean,
               std::vector<double>* s1, std::vector<double>* s2) {
  const BatchNormKernels<T>& k = NNK_ISA_CALL(batch_norm_kernels<T>());
  sum_all(
      layout_of(dy, x), x.N, x.C, x.S,
      [&](int64_t n, int64_t c, int64_t s0, int64_t s1_, double* a, double* q) {
        k.row_grad_sums(row_of(dy, n, c) + s0, row_of(x, n, c) + s0, s1_ - s0, mean[c], a + c,
                        q + c);
      },
      [&](int64_t n, int64_t s, int64_t P, double* a, double* q) {
        k.pix_grad_sums(pixel_of(dy, n, s), dy.ss, pixel_of(x, n, s), x.ss, P, x.C, mean, a, q);
      },
      [&](int64_t n, int64_t c, int64_t s, double* a, double* q) {
        const T g = at(dy, n, c, s);
        a[c] += double(g);
        q[c] += double(g * (at(x, n, c, s) - mean[c]));
      },
      s1, s2);
}

// dx = (dy - k0[c] - (x - mean[c]) * k1[c]) * k2[c] over the whole view.
template <class T>
void grad_apply(const View3<const T>& dy, const View3<const T>& x, const T* mean, const T* k0,
                const T* k1, const T* k2, const View3<T>& dx) {
  const BatchNormKernels<T>& k = NNK_ISA_CALL(batch_norm_kernels<T>());
  const bool stream = stream_output(dx);
  for_all(
      layout_of(dy, x, dx), x.N, x.C, x.S, stream,
      [&](int64_t n, int64_t c, int64_t s0, int64_t s1) {
        k.row_grad(row_of(dy, n, c) + s0, row_of(x, n, c) + s0, row_of(dx, n, c) + s0, s1 - s0,
                   mean[c], k0[c], k1[c], k2[c], stream, nullptr, nullptr, T(0), nullptr, nullptr);
      },
      [&](int64_t n, int64_t s, int64_t P) {
        k.pix_grad(pixel_of(dy, n, s), dy.ss, pixel_of(x, n, s), x.ss, pixel_of(dx, n, s), dx.ss, P,
                   x.C, mean, k0, k1, k2, stream);
      },
      [&](int64_t n, int64_t c, int64_t s) {
        at(dx, n, c, s) = (at(dy, n, c, s) - k0[c] - (at(x, n, c, s) - mean[c]) * k1[c]) * k2[c];
      });
}

}  // namespace

// ------------------------------------------------------------------------------------ stats

template <class T>
void batch_norm_stats(View3<const T> x, T* mean, T* m2) {
  x = normalised(x);
  const std::vector<T> shift = first_elements(x);
  std::vector<double> s1, s2;
  channel_sums(x, shift.data(), &s1, &s2);
  const double count = double(x.N * x.S);
  for (int64_t c = 0; c < x.C; ++c) {
    double mu, q;
    finish_stats(double(shift[size_t(c)]), s1[size_t(c)], s2[size_t(c)], count, &mu, &q);
    mean[c] = T(mu);
    m2[c] = T(q);
  }
}

template <class T>
void batch_norm_apply(View3<const T> x, View3<T> y, const T* center, const T* scale,
                      const T* shift) {
  x = normalised(x);
  y = normalised(y);
  if (center) {
    apply_all(x, y, center, scale, shift);
  } else {
    const std::vector<T> zero(size_t(x.C), T(0));
    apply_all(x, y, zero.data(), scale, shift);
  }
}

// ---------------------------------------------------------------------------- training forward

template <class T>
void batch_norm_forward_train(View3<const T> x, View3<T> y, const T* w, const T* b, double eps,
                              double momentum, T* save_mean, T* save_invstd, T* running_mean,
                              T* running_var) {
  x = normalised(x);
  y = normalised(y);
  const double count = double(x.N * x.S);
  const std::vector<T> shift = first_elements(x);
  struct Coef {
    T mean, scale, shift;  // y = (x - mean) * scale + shift
  };
  // From the channel's shifted sums: its coefficients and (write) save_mean, save_invstd and the
  // running statistics.
  auto finish = [&](int64_t c, double s1, double s2, bool write) {
    double mu, m2;
    finish_stats(double(shift[size_t(c)]), s1, s2, count, &mu, &m2);
    const double invstd = 1.0 / std::sqrt(m2 / count + eps);
    if (write) {
      save_mean[c] = T(mu);
      save_invstd[c] = T(invstd);
      if (running_mean)
        running_mean[c] = T((1 - momentum) * double(running_mean[c]) + momentum * mu);
      if (running_var)
        running_var[c] = T((1 - momentum) * double(running_var[c]) +
                           momentum * (count > 1 ? m2 / (count - 1) : m2 / count));
    }
    return Coef{T(mu), T(invstd * (w ? double(w[c]) : 1.0)), b ? b[c] : T(0)};
  };

  const bool short_ = x.N >= kShortRowImages && short_rows(x, y);
  if (layout_of(x, y) == Layout::rows && !short_) {
    const BatchNormKernels<T>& k = NNK_ISA_CALL(batch_norm_kernels<T>());
    const bool stream = stream_output(y);
    fused_sweep(
        x.N, x.C, x.S,
        [&](int64_t c, int64_t n, int64_t s0, int64_t s1, double* a, double* q) {
          k.row_sums(row_of(x, n, c) + s0, s1 - s0, shift[size_t(c)], a, q);
        },
        finish,
        [&](int64_t c, const Coef& f, int64_t n, int64_t s0, int64_t s1, int64_t next, double* a,
            double* q) {
          const bool more = next >= 0;
          k.row_affine(row_of(x, n, c) + s0, row_of(y, n, c) + s0, s1 - s0, f.mean, f.scale,
                       f.shift, stream, more ? row_of(x, n, next) + s0 : nullptr,
                       more ? shift[size_t(next)] : T(0), a, q);
        });
    return;
  }
  struct Coefs {
    std::vector<T> mean, scale, shift;
  };
  auto finish_all = [&](const std::vector<double>& s1, const std::vector<double>& s2, bool write) {
    Coefs f{std::vector<T>(size_t(x.C)), std::vector<T>(size_t(x.C)), std::vector<T>(size_t(x.C))};
    for (int64_t c = 0; c < x.C; ++c) {
      const Coef one = finish(c, s1[size_t(c)], s2[size_t(c)], write);
      f.mean[size_t(c)] = one.mean;
      f.scale[size_t(c)] = one.scale;
      f.shift[size_t(c)] = one.shift;
    }
    return f;
  };
  if (short_) {  // one pass of pixels of C*S values (see short_rows)
    const BatchNormKernels<T>& k = NNK_ISA_CALL(batch_norm_kernels<T>());
    const bool stream = stream_output(y);
    const int64_t S = x.S, CS = x.C * S;
    const std::vector<T> rshift = repeat(shift.data(), x.C, S);
    pixel_sweep(
        x.N, CS,
        [&](int64_t b, int64_t e, double* a, double* q) {
          k.pix_sums(x.p + b * x.sn, x.sn, e - b, CS, rshift.data(), a, q);
        },
        [&](const std::vector<double>& s1, const std::vector<double>& s2, bool write) {
          const Coefs f = finish_all(fold(s1, x.C, S), fold(s2, x.C, S), write);
          return Coefs{repeat(f.mean.data(), x.C, S), repeat(f.scale.data(), x.C, S),
                       repeat(f.shift.data(), x.C, S)};
        },
        [&](const Coefs& f, int64_t b, int64_t e) {
          k.pix_affine(x.p + b * x.sn, x.sn, y.p + b * y.sn, y.sn, e - b, CS, f.mean.data(),
                       f.scale.data(), f.shift.data(), stream);
        });
    return;
  }
  if (layout_of(x, y) == Layout::pixels) {
    const BatchNormKernels<T>& k = NNK_ISA_CALL(batch_norm_kernels<T>());
    const bool stream = stream_output(y);
    pixel_sweep(
        x.N * x.S, x.C,
        [&](int64_t b, int64_t e, double* a, double* q) {
          pixel_runs(x.S, b, e, [&](int64_t n, int64_t s, int64_t P) {
            k.pix_sums(pixel_of(x, n, s), x.ss, P, x.C, shift.data(), a, q);
          });
        },
        finish_all,
        [&](const Coefs& f, int64_t b, int64_t e) {
          pixel_runs(x.S, b, e, [&](int64_t n, int64_t s, int64_t P) {
            k.pix_affine(pixel_of(x, n, s), x.ss, pixel_of(y, n, s), y.ss, P, x.C, f.mean.data(),
                         f.scale.data(), f.shift.data(), stream);
          });
        });
    return;
  }
  std::vector<double> s1, s2;
  channel_sums(x, shift.data(), &s1, &s2);
  const Coefs f = finish_all(s1, s2, true);
  apply_all(x, y, f.mean.data(), f.scale.data(), f.shift.data());
}

// ----------------------------------------------------------------------------------- backward

template <class T>
void batch_norm_backward_reduce(View3<const T> dy, View3<const T> x, const T* mean, const T* invstd,
                                T* sum_dy, T* sum_dy_xhat) {
  dy = normalised(dy);
  x = normalised(x);
  std::vector<double> sdy, sdyx;
  grad_sums(dy, x, mean, &sdy, &sdyx);
  for (int64_t c = 0; c < x.C; ++c) {
    sum_dy[c] = T(sdy[size_t(c)]);
    sum_dy_xhat[c] = T(sdyx[size_t(c)] * double(invstd[c]));
  }
}

template <class T>
void batch_norm_backward_apply(View3<const T> dy, View3<const T> x, const T* mean, const T* invstd,
                               const T* w, const T* mean_dy, const T* mean_dy_xhat, View3<T> dx) {
  dy = normalised(dy);
  x = normalised(x);
  dx = normalised(dx);
  // dx = (dy - mean_dy - (x - mean) * invstd * mean_dy_xhat) * invstd * w
  std::vector<T> k1(size_t(x.C)), k2(size_t(x.C));
  for (int64_t c = 0; c < x.C; ++c) {
    k1[size_t(c)] = T(double(invstd[c]) * double(mean_dy_xhat[c]));
    k2[size_t(c)] = T(double(invstd[c]) * (w ? double(w[c]) : 1.0));
  }
  grad_apply(dy, x, mean, mean_dy, k1.data(), k2.data(), dx);
}

template <class T>
void batch_norm_backward_train(View3<const T> dy, View3<const T> x, const T* mean, const T* invstd,
                               const T* w, View3<T> dx, T* dw, T* db) {
  dy = normalised(dy);
  x = normalised(x);
  dx = normalised(dx);
  const double count = double(x.N * x.S);
  struct Coef {
    T k0, k1, k2;  // dx = (dy - k0 - (x - mean) * k1) * k2
  };
  // From the channel's sums: the coefficients of dx and (write) dw, db.
  auto finish = [&](int64_t c, double sdy, double sdyx, bool write) {
    const double is = double(invstd[c]);
    if (write && dw) dw[c] = T(sdyx * is);
    if (write && db) db[c] = T(sdy);
    return Coef{T(sdy / count), T(sdyx / count * is * is), T(is * (w ? double(w[c]) : 1.0))};
  };

  const Layout layout = dx.p ? layout_of(dy, x, dx) : layout_of(dy, x);
  const bool short_ = dx.p && x.N >= kShortRowImages && short_rows(dy, x, dx);
  if (layout == Layout::rows && dx.p && !short_) {
    const BatchNormKernels<T>& k = NNK_ISA_CALL(batch_norm_kernels<T>());
    const bool stream = stream_output(dx);
    fused_sweep(
        x.N, x.C, x.S,
        [&](int64_t c, int64_t n, int64_t s0, int64_t s1, double* a, double* q) {
          k.row_grad_sums(row_of(dy, n, c) + s0, row_of(x, n, c) + s0, s1 - s0, mean[c], a, q);
        },
        finish,
        [&](int64_t c, const Coef& f, int64_t n, int64_t s0, int64_t s1, int64_t next, double* a,
            double* q) {
          const bool more = next >= 0;
          k.row_grad(row_of(dy, n, c) + s0, row_of(x, n, c) + s0, row_of(dx, n, c) + s0, s1 - s0,
                     mean[c], f.k0, f.k1, f.k2, stream, more ? row_of(dy, n, next) + s0 : nullptr,
                     more ? row_of(x, n, next) + s0 : nullptr, more ? mean[next] : T(0), a, q);
        });
    return;
  }
  struct Coefs {
    std::vector<T> k0, k1, k2;
  };
  auto finish_all = [&](const std::vector<double>& sdy, const std::vector<double>& sdyx,
                        bool write) {
    Coefs f{std::vector<T>(size_t(x.C)), std::vector<T>(size_t(x.C)), std::vector<T>(size_t(x.C))};
    for (int64_t c = 0; c < x.C; ++c) {
      const Coef one = finish(c, sdy[size_t(c)], sdyx[size_t(c)], write);
      f.k0[size_t(c)] = one.k0;
      f.k1[size_t(c)] = one.k1;
      f.k2[size_t(c)] = one.k2;
    }
    return f;
  };
  if (short_) {  // one pass of pixels of C*S values (see short_rows)
    const BatchNormKernels<T>& k = NNK_ISA_CALL(batch_norm_kernels<T>());
    const bool stream = stream_output(dx);
    const int64_t S = x.S, CS = x.C * S;
    const std::vector<T> rmean = repeat(mean, x.C, S);
    pixel_sweep(
        x.N, CS,
        [&](int64_t b, int64_t e, double* a, double* q) {
          k.pix_grad_sums(dy.p + b * dy.sn, dy.sn, x.p + b * x.sn, x.sn, e - b, CS, rmean.data(), a,
                          q);
        },
        [&](const std::vector<double>& s1, const std::vector<double>& s2, bool write) {
          const Coefs f = finish_all(fold(s1, x.C, S), fold(s2, x.C, S), write);
          return Coefs{repeat(f.k0.data(), x.C, S), repeat(f.k1.data(), x.C, S),
                       repeat(f.k2.data(), x.C, S)};
        },
        [&](const Coefs& f, int64_t b, int64_t e) {
          k.pix_grad(dy.p + b * dy.sn, dy.sn, x.p + b * x.sn, x.sn, dx.p + b * dx.sn, dx.sn, e - b,
                     CS, rmean.data(), f.k0.data(), f.k1.data(), f.k2.data(), stream);
        });
    return;
  }
  if (layout == Layout::pixels && dx.p) {
    const BatchNormKernels<T>& k = NNK_ISA_CALL(batch_norm_kernels<T>());
    const bool stream = stream_output(dx);
    pixel_sweep(
        x.N * x.S, x.C,
        [&](int64_t b, int64_t e, double* a, double* q) {
          pixel_runs(x.S, b, e, [&](int64_t n, int64_t s, int64_t P) {
            k.pix_grad_sums(pixel_of(dy, n, s), dy.ss, pixel_of(x, n, s), x.ss, P, x.C, mean, a, q);
          });
        },
        finish_all,
        [&](const Coefs& f, int64_t b, int64_t e) {
          pixel_runs(x.S, b, e, [&](int64_t n, int64_t s, int64_t P) {
            k.pix_grad(pixel_of(dy, n, s), dy.ss, pixel_of(x, n, s), x.ss, pixel_of(dx, n, s),
                       dx.ss, P, x.C, mean, f.k0.data(), f.k1.data(), f.k2.data(), stream);
          });
        });
    return;
  }
  std::vector<double> sdy, sdyx;
  grad_sums(dy, x, mean, &sdy, &sdyx);
  const Coefs f = finish_all(sdy, sdyx, true);
  if (dx.p) grad_apply(dy, x, mean, f.k0.data(), f.k1.data(), f.k2.data(), dx);
}

#define NNK_INSTANTIATE_BN(T)                                                                     \
  template void batch_norm_stats<T>(View3<const T>, T*, T*);                                      \
  template void batch_norm_apply<T>(View3<const T>, View3<T>, const T*, const T*, const T*);      \
  template void batch_norm_forward_train<T>(View3<const T>, View3<T>, const T*, const T*, double, \
                                            double, T*, T*, T*, T*);                              \
  template void batch_norm_backward_reduce<T>(View3<const T>, View3<const T>, const T*, const T*, \
                                              T*, T*);                                            \
  template void batch_norm_backward_apply<T>(View3<const T>, View3<const T>, const T*, const T*,  \
                                             const T*, const T*, const T*, View3<T>);             \
  template void batch_norm_backward_train<T>(View3<const T>, View3<const T>, const T*, const T*,  \
                                             const T*, View3<T>, T*, T*);
NNK_INSTANTIATE_BN(float)
NNK_INSTANTIATE_BN(double)

// ---------------------------------------------------------------------------------- bfloat16
// bfloat16 activations with float32 weight, bias and statistics (torch's mixed-dtype batch norm):
// the float32 passes above run on blocks of channels widened into float32 scratch of at most
// kBf16BlockFloats values per operand (statistics are per channel, so a block is exact on its
// own): each bfloat16 value is read from memory once per call and each result rounded once, while
// the float32 copies stay in the caches.
namespace {

constexpr int64_t kBf16BlockFloats = int64_t(1) << 18;

// The float32 view (same layout kind: channels innermost or unit-stride rows) of cb channels of
// an (N, C, S) view, at buf.
template <class V>
View3<float> block_view(const V& v, int64_t cb, float* buf) {
  View3<float> r;
  r.p = buf, r.N = v.N, r.C = cb, r.S = v.S;
  if (v.sc == 1 && v.C > 1)
    r.sc = 1, r.ss = cb, r.sn = v.S * cb;
  else
    r.ss = 1, r.sc = v.S, r.sn = cb * v.S;
  return r;
}

// d (channels [c0, c0 + d.C) of v) = v widened (kWiden) or d rounded into v: unit-stride runs
// (a row of S values, or a pixel's d.C channels) through the vector conversions.
template <bool kWiden>
void move_block(std::conditional_t<kWiden, const View3<const uint16_t>&, const View3<uint16_t>&> v,
                int64_t c0, const View3<float>& d) {
  auto run = [&](auto* src, float* f, int64_t n, int64_t step) {
    if constexpr (kWiden)
      bf16_to_f32_n(src, f, n, step);
    else
      f32_to_bf16_n(f, src, n, step);
  };
  if (d.sc == 1) {  // pixels of d.C channels (v's channel stride v.sc)
    parallel_for(v.N * v.S, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        run(v.p + i / v.S * v.sn + c0 * v.sc + i % v.S * v.ss, d.p + i * d.C, d.C, v.sc);
    });
  } else {  // rows of S values (v's pixel stride v.ss)
    parallel_for(v.N * d.C, 1 + 4096 / (v.S + 1), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        run(v.p + i / d.C * v.sn + (c0 + i % d.C) * v.sc, d.p + i * v.S, v.S, v.ss);
    });
  }
}

// fn(c0, cb, bufs) over blocks of channels; bufs: `operands` float32 buffers of N S cb values.
template <class F>
void for_channel_blocks(int64_t N, int64_t C, int64_t S, int operands, F&& fn) {
  const int64_t per = N * S;
  const int64_t cb = per <= 0 ? C : std::max<int64_t>(1, std::min(C, kBf16BlockFloats / per));
  float* buf = thread_scratch<float>(Scratch::batch_norm_bf16, size_t(operands * per * cb) + 1);
  for (int64_t c0 = 0; c0 < C; c0 += cb) {
    const int64_t n = std::min(cb, C - c0);
    float* bufs[3] = {buf, buf + per * n, buf + 2 * per * n};
    fn(c0, n, bufs);
  }
}

template <class T>
View3<const T> ro(const View3<T>& v) {
  return View3<const T>{v.p, v.N, v.C, v.S, v.sn, v.sc, v.ss};
}

const float* at(const float* p, int64_t c0) { return p ? p + c0 : nullptr; }
float* at(float* p, int64_t c0) { return p ? p + c0 : nullptr; }

}  // namespace

void batch_norm_forward_train_bf16(View3<const uint16_t> x, View3<uint16_t> y, const float* w,
                                   const float* b, double eps, double momentum, float* save_mean,
                                   float* save_invstd, float* running_mean, float* running_var) {
  for_channel_blocks(x.N, x.C, x.S, 2, [&](int64_t c0, int64_t cb, float** buf) {
    const View3<float> xf = block_view(x, cb, buf[0]), yf = block_view(y, cb, buf[1]);
    move_block<true>(x, c0, xf);
    batch_norm_forward_train<float>(ro(xf), yf, at(w, c0), at(b, c0), eps, momentum, save_mean + c0,
                                    save_invstd + c0, at(running_mean, c0), at(running_var, c0));
    move_block<false>(y, c0, yf);
  });
}

// One pass when every run is unit-stride (rows of S values, or pixels of C channels): each run
// widened in pieces into a float32 buffer on the stack, the affine applied, rounded back (eval
// needs no statistics, so no scratch block); other layouts through the blocks.
void batch_norm_apply_bf16(View3<const uint16_t> x, View3<uint16_t> y, const float* center,
                           const float* scale, const float* shift) {
  constexpr int64_t kPiece = 512;
  // n values from src to dst, coefficient j0 + i of each array when per_value, else the scalars.
  auto piece = [&](const uint16_t* src, uint16_t* dst, int64_t n, int64_t j0, bool per_value) {
    float buf[kPiece];
    for (int64_t i0 = 0; i0 < n; i0 += kPiece) {
      const int64_t m = std::min(kPiece, n - i0);
      bf16_to_f32_n(src + i0, buf, m);
      if (per_value) {
        const int64_t j = j0 + i0;
        for (int64_t i = 0; i < m; ++i)
          buf[i] = (buf[i] - (center ? center[j + i] : 0.f)) * scale[j + i] + shift[j + i];
      } else {
        const float c = center ? center[j0] : 0.f, sc = scale[j0], sh = shift[j0];
        for (int64_t i = 0; i < m; ++i) buf[i] = (buf[i] - c) * sc + sh;
      }
      f32_to_bf16_n(buf, dst + i0, m);
    }
  };
  const View3<const uint16_t> xn = normalised(x);
  const View3<uint16_t> yn = normalised(y);
  if (xn.ss == 1 && yn.ss == 1) {  // rows
    parallel_for(xn.N * xn.C, 1 + 4096 / (xn.S + 1), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / xn.C, c = i % xn.C;
        piece(xn.p + n * xn.sn + c * xn.sc, yn.p + n * yn.sn + c * yn.sc, xn.S, c, false);
      }
    });
    return;
  }
  if (xn.sc == 1 && yn.sc == 1) {  // pixels
    parallel_for(xn.N * xn.S, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / xn.S, q = i % xn.S;
        piece(xn.p + n * xn.sn + q * xn.ss, yn.p + n * yn.sn + q * yn.ss, xn.C, 0, true);
      }
    });
    return;
  }
  for_channel_blocks(x.N, x.C, x.S, 2, [&](int64_t c0, int64_t cb, float** buf) {
    const View3<float> xf = block_view(x, cb, buf[0]), yf = block_view(y, cb, buf[1]);
    move_block<true>(x, c0, xf);
    batch_norm_apply<float>(ro(xf), yf, at(center, c0), scale + c0, shift + c0);
    move_block<false>(y, c0, yf);
  });
}

void batch_norm_backward_reduce_bf16(View3<const uint16_t> dy, View3<const uint16_t> x,
                                     const float* mean, const float* invstd, float* sum_dy,
                                     float* sum_dy_xhat) {
  for_channel_blocks(x.N, x.C, x.S, 2, [&](int64_t c0, int64_t cb, float** buf) {
    const View3<float> dyf = block_view(dy, cb, buf[0]), xf = block_view(x, cb, buf[1]);
    move_block<true>(dy, c0, dyf);
    move_block<true>(x, c0, xf);
    batch_norm_backward_reduce<float>(ro(dyf), ro(xf), mean + c0, invstd + c0, sum_dy + c0,
                                      sum_dy_xhat + c0);
  });
}

void batch_norm_backward_train_bf16(View3<const uint16_t> dy, View3<const uint16_t> x,
                                    const float* mean, const float* invstd, const float* w,
                                    View3<uint16_t> dx, float* dw, float* db) {
  for_channel_blocks(x.N, x.C, x.S, 3, [&](int64_t c0, int64_t cb, float** buf) {
    const View3<float> dyf = block_view(dy, cb, buf[0]), xf = block_view(x, cb, buf[1]);
    const View3<float> dxf = dx.p ? block_view(dx, cb, buf[2]) : View3<float>{};
    move_block<true>(dy, c0, dyf);
    move_block<true>(x, c0, xf);
    batch_norm_backward_train<float>(ro(dyf), ro(xf), mean + c0, invstd + c0, at(w, c0), dxf,
                                     at(dw, c0), at(db, c0));
    if (dx.p) move_block<false>(dx, c0, dxf);
  });
}

}  // namespace cpu
}  // namespace nnk
#endif  // NNK_BASELINE_PASS
