// Fused softmax-cross-entropy (both backends; arguments: common/cross_entropy_args.h): one kernel
// reads each row of logits once for the loss (online max and sum-exp) and, when asked, writes the
// row's gradient right after, so the backward only scales it. torch.nn.functional.cross_entropy's
// options: class-index or probability targets, class weights, ignore_index, label smoothing.
//
// On the CPU, rows run in parallel; each row is read by row_stats (max, sum-exp and the linear sums
// the options need, one pass) and, for the gradient, once more by row_grad while it is still in
// L2, which writes d loss / d x with streaming stores.
//
// Per row, with lse = m + log s, p = exp((x - m) - log s), eps = label smoothing, w = weights (1 if
// none), W = sum_c w_c:
//   class target t:  loss = (1 - eps) w_t (lse - x_t) + eps / C sum_c w_c (lse - x_c)
//                    dx_c = p_c ((1 - eps) w_t + eps W / C) - eps / C w_c - [c = t] (1 - eps) w_t
//   probabilities q: q' = (1 - eps) q + eps / C,  loss = sum_c w_c q'_c (lse - x_c)
//                    dx_c = p_c sum_k w_k q'_k - w_c q'_c
// (torch's formulas: cross_entropy_loss_label_smoothing and the probability-target path).
//
// Two parts: the row loops (the CrossEntropyKernels table), compiled once per ISA, and the driver
// (rows, threads and the loss), compiled once. A row is n = C unit-stride logits x; w (nullable)
// the C class weights, t (nullable) the row's C target probabilities.
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/cross_entropy_args.h"
#include "common/simd.h"
#include "common/simd_math.h"

namespace nnk {
namespace cpu {

// What one pass over a row gathers, in float64: m = max x, s = sum exp(x - m) (online: the running
// max rescales the running sum, so x is read once), and when asked for wx = sum w (x - shift),
// wtx = sum w t (x - shift), wt = sum w t (w = 1 when null; shift = the row's first value when
// finite, else 0).
struct RowStats {
  double m, s, shift, wx, wtx, wt;
};

template <class T>
struct CrossEntropyKernels {
  // want_wx: also wx (label smoothing needs it); t non-null: also wtx, wt.
  void (*row_stats)(const T* x, int64_t n, const T* w, const T* t, bool want_wx, RowStats* out);
  // g = exp(x - m - logs) * a - w * (k0 + k1 * t)   (m: the row max, logs: log sum exp(x - m);
  // w = 1 when null, the t term only when t is non-null). stream: non-temporal stores where g
  // is aligned (g is not read back). g may be x itself.
  void (*row_grad)(const T* x, int64_t n, T m, T logs, T a, T k0, T k1, const T* w, const T* t,
                   T* g, bool stream);
};

}  // namespace cpu
}  // namespace nnk

// ============================================================ SIMD loops (compiled once per ISA)
// row_stats reads the row once: per lane a running max M and a sum S of exp(x - M); each block of
// U vectors raises M to the block's max and rescales S by exp(M_old - M_new) (one extra exp per
// block), so max and sum-exp need no second read. Every kFlush values the lanes' S (with their
// M) and the linear sums move to float64, so no lane sums more than kFlush / W values in T.
// row_grad re-reads the row (now in L2: 128 KB for C = 32000 floats) and writes the gradient.
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
        const double nm = hi(m[l], double(lm[l]));
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

  // A row shorter than one vector (C < W: the 10 classes of a digits classifier): one padded
  // vector, no per-lane state. The pad is -inf, whose exp is 0.
  template <bool HW, bool HT, bool WX>
  static void short_stats(const T* x, int64_t n, const T* w, const T* t, T shift,
                          cpu::RowStats* out) {
    const V xv = S::load_part(x, int(n), -std::numeric_limits<T>::infinity());
    const T m = hi(-std::numeric_limits<T>::max(), S::reduce_max(xv));
    const double s = double(S::reduce_add(vexp<T>(S::sub(xv, S::set1(m)))));
    double wx = 0, wtx = 0, wt = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double xj = double(x[j]) - shift, wj = HW ? double(w[j]) : 1.0;
      if constexpr (WX) wx += wj * xj;
      if constexpr (HT) wtx += wj * double(t[j]) * xj, wt += wj * double(t[j]);
    }
    *out = cpu::RowStats{double(m), s, double(shift), wx, wtx, wt};
  }

  template <bool HW, bool HT, bool WX>
  static void stats(const T* x, int64_t n, const T* w, const T* t, cpu::RowStats* out) {
    const T shift = n > 0 && std::isfinite(x[0]) ? x[0] : T(0);
    if (n < W) return short_stats<HW, HT, WX>(x, n, w, t, shift, out);
    Acc acc;
    const V H = S::set1(shift);
    int64_t i = 0;
    const int64_t nvec = n - n % W;
    while (i < nvec) {
      const int64_t end = lo(nvec, i + kFlush);
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
      if constexpr (WX) acc.wx += S::reduce_add_f64(awx);
      if constexpr (HT) acc.wtx += S::reduce_add_f64(awtx), acc.wt += S::reduce_add_f64(awt);
    }
    double m = acc.m[0];
    for (int l = 1; l < W; ++l) m = hi(m, acc.m[l]);
    for (int64_t j = i; j < n; ++j) m = hi(m, double(x[j]));
    // The lanes' sums rescaled to m, and the last n % W values, with one vector exp each (scalar
    // exps here cost ~0.3 us a row: short rows are all tail). The tail is padded with -inf, whose
    // exp is 0.
    alignas(64) T lm[W], ls[W], tail[W];
    for (int l = 0; l < W; ++l) {
      lm[l] = T(acc.m[l]), ls[l] = T(acc.s[l]);
      tail[l] = i + l < n ? x[i + l] : -std::numeric_limits<T>::infinity();
    }
    const V Mv = S::set1(T(m));
    double s = S::reduce_add_f64(S::mul(S::load(ls), vexp<T>(S::sub(S::load(lm), Mv))));
    if (i < n) s += S::reduce_add_f64(vexp<T>(S::sub(S::load(tail), Mv)));
    for (int64_t j = i; j < n; ++j) {
      const double xj = double(x[j]) - shift, wj = HW ? double(w[j]) : 1.0;
      if constexpr (WX) acc.wx += wj * xj;
      if constexpr (HT) acc.wtx += wj * double(t[j]) * xj, acc.wt += wj * double(t[j]);
    }
    // A NaN anywhere must reach the loss; the max may have dropped one from m, but not from s.
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
    if (i < n) {  // the last n % W values through the same vector code, on padded loads
      const int r = int(n - i);
      V b = HT ? S::fma(K1, S::load_part(t + i, r, T(0)), K0) : K0;
      if (HW) b = S::mul(b, S::load_part(w + i, r, T(0)));
      const V xv = S::load_part(x + i, r, T(0));
      alignas(64) T pg[W];
      S::store(pg, S::sub(S::mul(vexp<T>(S::sub(S::sub(xv, M), LS)), A), b));
      for (int j = 0; j < r; ++j) g[i + j] = pg[j];
    }
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

NNK_ISA_TABLE(cross_entropy_kernels, cpu::CrossEntropyKernels, CrossEntropyLoops)

}  // namespace NNK_ISA_NS
}  // namespace nnk

// ======================================================================== driver (compiled once)
#if NNK_BASELINE_PASS
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/isa.h"
#include "common/threading.h"
#include "common/workspace.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace nnk {
NNK_PER_ISA(template <class T> const cpu::CrossEntropyKernels<T>& cross_entropy_kernels())
}  // namespace nnk

namespace nnk {
namespace cpu {

template <class T>
int64_t cross_entropy_check_targets(const int64_t* target, int64_t rows, int64_t C,
                                    int64_t ignore_index, const T* weight, double* total) {
  double sum = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = target[i];
    if (t == ignore_index) continue;
    if (t < 0 || t >= C) return i;
    sum += weight ? double(weight[t]) : 1.0;
  }
  *total = sum;
  return -1;
}

namespace {

// CrossEntropyArgs with its pointers typed.
template <class T>
struct TypedArgs {
  const T* x;
  int64_t rows, C, ldx;
  const int64_t* target;
  int64_t ignore_index;
  const T* soft;
  int64_t ldt;
  const T* weight;
  double smoothing;
  T* loss;
  T* grad;
  int64_t ldg;
  double grad_scale;
};

template <class T>
TypedArgs<T> typed(const CrossEntropyArgs& a) {
  return {static_cast<const T*>(a.x),
          a.rows,
          a.C,
          a.ldx,
          a.target,
          a.ignore_index,
          static_cast<const T*>(a.soft),
          a.ldt,
          static_cast<const T*>(a.weight),
          a.smoothing,
          static_cast<T*>(a.loss),
          static_cast<T*>(a.grad),
          a.ldg,
          a.grad_scale};
}

template <class T>
void forward_rows(const TypedArgs<T>& a, const CrossEntropyKernels<T>& k, double wsum, bool stream,
                  int64_t r0, int64_t r1) {
  const double eps = a.smoothing, C = double(a.C), gs = a.grad_scale;
  const bool smooth = eps > 0;
  for (int64_t i = r0; i < r1; ++i) {
    const T* x = a.x + i * a.ldx;
    T* g = a.grad ? a.grad + i * a.ldg : nullptr;
    RowStats st;
    if (a.target) {
      const int64_t t = a.target[i];
      if (t == a.ignore_index) {
        a.loss[i] = 0;
        if (g) std::memset(g, 0, sizeof(T) * a.C);
        continue;
      }
      const T* w = smooth ? a.weight : nullptr;  // without smoothing only w_t matters
      k.row_stats(x, a.C, w, nullptr, smooth, &st);
      const double logs = std::log(st.s), lse = st.m + logs;
      const double wt = a.weight ? double(a.weight[t]) : 1.0;
      double loss = (1 - eps) * wt * (lse - double(x[t]));
      if (smooth) loss += eps / C * (wsum * (lse - st.shift) - st.wx);
      a.loss[i] = T(loss);
      if (g) {
        k.row_grad(x, a.C, T(st.m), T(logs), T(gs * ((1 - eps) * wt + eps * wsum / C)),
                   T(gs * eps / C), T(0), w, nullptr, g, stream);
        g[t] = T(double(g[t]) - gs * (1 - eps) * wt);
      }
    } else {
      const T* q = a.soft + i * a.ldt;
      k.row_stats(x, a.C, a.weight, q, smooth, &st);
      const double logs = std::log(st.s), lse = st.m + logs;
      const double swq = (1 - eps) * st.wt + eps / C * wsum;     // sum w q'
      const double swqx = (1 - eps) * st.wtx + eps / C * st.wx;  // sum w q' (x - shift)
      a.loss[i] = T(swq * (lse - st.shift) - swqx);
      if (g)
        k.row_grad(x, a.C, T(st.m), T(logs), T(gs * swq), T(gs * eps / C), T(gs * (1 - eps)),
                   a.weight, q, g, stream);
    }
  }
#if defined(__SSE2__)
  if (stream) _mm_sfence();  // streamed stores visible before the caller reads the gradient
#endif
}

}  // namespace

template <class T>
void cross_entropy_forward(const CrossEntropyArgs& args) {
  if (args.rows == 0) return;
  const TypedArgs<T> a = typed<T>(args);
  double wsum = double(a.C);
  if (a.weight) {
    wsum = 0;
    for (int64_t c = 0; c < a.C; ++c) wsum += double(a.weight[c]);
  }
  const auto& k = NNK_ISA_CALL(cross_entropy_kernels<T>());
  const bool stream = a.grad && a.rows * a.C * int64_t(sizeof(T)) >= stream_min_bytes();
  // A row is C exps or so: about 16K values per task keeps the split worth its cost.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(a.C, 1));
  parallel_for(a.rows, grain,
               [&](int64_t r0, int64_t r1) { forward_rows(a, k, wsum, stream, r0, r1); });
}

#define NNK_INSTANTIATE(T)                                                                   \
  template int64_t cross_entropy_check_targets<T>(const int64_t*, int64_t, int64_t, int64_t, \
                                                  const T*, double*);                        \
  template void cross_entropy_forward<T>(const CrossEntropyArgs&);
NNK_INSTANTIATE(float)
NNK_INSTANTIATE(double)
#undef NNK_INSTANTIATE

}  // namespace cpu
}  // namespace nnk
#endif  // NNK_BASELINE_PASS
