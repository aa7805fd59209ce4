// Cross-entropy row loops (the CrossEntropyKernels table of cross_entropy_kernel.h), written once
// against Simd<T> and compiled once per ISA. Include after simd.h in a cross_entropy_<isa>.cpp.
//
// row_stats reads the row once: per lane a running max M and a sum S of exp(x - M); each block of
// U vectors raises M to the block's max and rescales S by exp(M_old - M_new) (one extra exp per
// block), so max and sum-exp need no second read. Every kFlush values the lanes' S (with their
// M) and the linear sums move to float64, so no lane sums more than kFlush / W values in T.
// row_grad re-reads the row (now in L2: 128 KB for C = 32000 floats) and writes the gradient.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/simd_math.h"
#include "cpu/cross_entropy_kernel.h"

namespace nnk {
namespace NNK_ISA_NS {

template <class T>
struct CrossEntropyLoops {
  using S = Simd<T>;
  using V = typename S::V;
  static constexpr int W = S::W;
  static constexpr int U = 4;  // vectors per block of the stats loop
  static constexpr int64_t kFlush = 2048;

  // Float64 running state of one row: per-lane (M, S) plus the linear sums.
  struct Acc {
    double m[W], s[W];
    double wx = 0, wtx = 0, wt = 0;
    Acc() {
      for (int l = 0; l < W; ++l) m[l] = -double(std::numeric_limits<T>::max()), s[l] = 0;
    }
    // Lanes (vm, vs) joined into (m, s): s = s exp(m - m') + vs exp(vm - m').
    void join(V vm, V vs) {
      alignas(64) T lm[W], ls[W];
      S::store(lm, vm);
      S::store(ls, vs);
      for (int l = 0; l < W; ++l) {
        if (s[l] == 0) {  // nothing to rescale (the first chunk): no exps
          m[l] = lm[l], s[l] = ls[l];
          continue;
        }
        const double nm = std::max(m[l], double(lm[l]));
        s[l] = s[l] * std::exp(m[l] - nm) + double(ls[l]) * std::exp(double(lm[l]) - nm);
        m[l] = nm;
      }
    }
  };

  // xv: the values at i minus the row's shift (sums of w (x - shift) keep their precision when
  // every logit is large, e.g. 1e4 +- 1).
  template <bool HW, bool HT, bool WX>
  static NNK_INLINE void linear_sums(const T* w, const T* t, int64_t i, V xv, V* awx, V* awtx,
                                     V* awt) {
    if constexpr (WX || HT) {
      const V wv = HW ? S::load(w + i) : S::set1(T(1));
      if constexpr (WX) *awx = S::fma(wv, xv, *awx);
      if constexpr (HT) {
        const V wt = HW ? S::mul(wv, S::load(t + i)) : S::load(t + i);
        *awtx = S::fma(wt, xv, *awtx);
        *awt = S::add(*awt, wt);
      }
    }
  }

  template <bool HW, bool HT, bool WX>
  static void stats(const T* x, int64_t n, const T* w, const T* t, cpu::RowStats* out) {
    Acc acc;
    const T shift = n > 0 && std::isfinite(x[0]) ? x[0] : T(0);
    const V H = S::set1(shift);
    int64_t i = 0;
    const int64_t nvec = n - n % W;
    while (i < nvec) {
      const int64_t end = std::min(nvec, i + kFlush);
      V M = S::set1(-std::numeric_limits<T>::max()), Sum = S::zero();
      V awx = S::zero(), awtx = S::zero(), awt = S::zero();
      for (; i + U * W <= end; i += U * W) {
        V xv[U];
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) xv[u] = S::load(x + i + u * W);
        const V Mn = S::max(M, S::max(S::max(xv[0], xv[1]), S::max(xv[2], xv[3])));
        Sum = S::mul(Sum, vexp<T>(S::sub(M, Mn)));
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
          Sum = S::add(Sum, vexp<T>(S::sub(xv[u], Mn)));
          linear_sums<HW, HT, WX>(w, t, i + u * W, S::sub(xv[u], H), &awx, &awtx, &awt);
        }
        M = Mn;
      }
      for (; i < end; i += W) {  // the last < U vectors of the chunk
        const V xv = S::load(x + i);
        const V Mn = S::max(M, xv);
        Sum = S::add(S::mul(Sum, vexp<T>(S::sub(M, Mn))), vexp<T>(S::sub(xv, Mn)));
        linear_sums<HW, HT, WX>(w, t, i, S::sub(xv, H), &awx, &awtx, &awt);
        M = Mn;
      }
      acc.join(M, Sum);
      if constexpr (WX) acc.wx += double(hsum<T>(awx));
      if constexpr (HT) acc.wtx += double(hsum<T>(awtx)), acc.wt += double(hsum<T>(awt));
    }
    double m = acc.m[0];
    for (int l = 1; l < W; ++l) m = std::max(m, acc.m[l]);
    for (int64_t j = i; j < n; ++j) m = std::max(m, double(x[j]));
    // the lanes' sums rescaled to m with one vector exp (scalar exps here cost ~0.3 us a row)
    alignas(64) T lm[W], ls[W];
    for (int l = 0; l < W; ++l) lm[l] = T(acc.m[l]), ls[l] = T(acc.s[l]);
    double s = double(hsum<T>(S::mul(S::load(ls), vexp<T>(S::sub(S::load(lm), S::set1(T(m)))))));
    for (int64_t j = i; j < n; ++j) {
      const double xj = double(x[j]) - shift, wj = HW ? double(w[j]) : 1.0;
      s += std::exp(double(x[j]) - m);
      if constexpr (WX) acc.wx += wj * xj;
      if constexpr (HT) acc.wtx += wj * double(t[j]) * xj, acc.wt += wj * double(t[j]);
    }
    // A NaN anywhere must reach the loss; std::max may have dropped one from m, but not from s.
    *out = cpu::RowStats{m, s, double(shift), acc.wx, acc.wtx, acc.wt};
  }

  static void row_stats(const T* x, int64_t n, const T* w, const T* t, bool want_wx,
                        cpu::RowStats* out) {
    const bool hw = w != nullptr;
    if (t) {
      if (hw)
        want_wx ? stats<true, true, true>(x, n, w, t, out)
                : stats<true, true, false>(x, n, w, t, out);
      else
        want_wx ? stats<false, true, true>(x, n, w, t, out)
                : stats<false, true, false>(x, n, w, t, out);
    } else if (want_wx) {
      hw ? stats<true, false, true>(x, n, w, t, out) : stats<false, false, true>(x, n, w, t, out);
    } else {
      stats<false, false, false>(x, n, w, t, out);
    }
  }

  static NNK_INLINE bool aligned(const T* p) {
    return (reinterpret_cast<uintptr_t>(p) % sizeof(V)) == 0;
  }

  template <bool HW, bool HT>
  static void grad(const T* x, int64_t n, T m, T logs, T a, T k0, T k1, const T* w, const T* t,
                   T* g, bool stream) {
    auto one = [&](int64_t j) {
      double b = HT ? double(k0) + double(k1) * double(t[j]) : double(k0);
      if (HW) b *= double(w[j]);
      g[j] = T(std::exp(double(x[j] - m) - double(logs)) * double(a) - b);
    };
    int64_t i = 0;
    if (stream)
      for (; i < n && !aligned(g + i); ++i) one(i);
    const V M = S::set1(m), LS = S::set1(logs), A = S::set1(a), K0 = S::set1(k0), K1 = S::set1(k1);
    auto vec = [&](int64_t j) {
      V b = HT ? S::fma(K1, S::load(t + j), K0) : K0;
      if (HW) b = S::mul(b, S::load(w + j));
      // (x - m) - log s, not x - lse: x - m is exact for close values (logits of 1e4 +- 1)
      return S::sub(S::mul(vexp<T>(S::sub(S::sub(S::load(x + j), M), LS)), A), b);
    };
    if (stream) {
      for (; i + 2 * W <= n; i += 2 * W) {
        const V r0 = vec(i), r1 = vec(i + W);
        S::stream(g + i, r0);
        S::stream(g + i + W, r1);
      }
    } else {
      for (; i + 2 * W <= n; i += 2 * W) {
        const V r0 = vec(i), r1 = vec(i + W);
        S::store(g + i, r0);
        S::store(g + i + W, r1);
      }
    }
    for (; i + W <= n; i += W) S::store(g + i, vec(i));  // short rows: no scalar exps
    for (; i < n; ++i) one(i);
  }

  static void row_grad(const T* x, int64_t n, T m, T logs, T a, T k0, T k1, const T* w, const T* t,
                       T* g, bool stream) {
    if (t)
      w ? grad<true, true>(x, n, m, logs, a, k0, k1, w, t, g, stream)
        : grad<false, true>(x, n, m, logs, a, k0, k1, w, t, g, stream);
    else
      w ? grad<true, false>(x, n, m, logs, a, k0, k1, w, t, g, stream)
        : grad<false, false>(x, n, m, logs, a, k0, k1, w, t, g, stream);
  }

  static constexpr cpu::CrossEntropyKernels<T> table() { return {&row_stats, &row_grad}; }
};

}  // namespace NNK_ISA_NS
}  // namespace nnk
