// Fused softmax-cross-entropy, CPU (cross_entropy.h). Rows run in parallel; each row is read by
// row_stats (max, sum-exp and the linear sums the options need, one pass) and, for the gradient,
// once more by row_grad while it is still in L2, which writes d loss / d x with streaming stores.
//
// Per row, with lse = m + log s, p = exp((x - m) - log s), eps = label smoothing, w = weights (1 if
// none), W = sum_c w_c:
//   class target t:  loss = (1 - eps) w_t (lse - x_t) + eps / C sum_c w_c (lse - x_c)
//                    dx_c = p_c ((1 - eps) w_t + eps W / C) - eps / C w_c - [c = t] (1 - eps) w_t
//   probabilities q: q' = (1 - eps) q + eps / C,  loss = sum_c w_c q'_c (lse - x_c)
//                    dx_c = p_c sum_k w_k q'_k - w_c q'_c
// (torch's formulas: cross_entropy_loss_label_smoothing and the probability-target path).
#include "cpu/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/isa.h"
#include "common/threading.h"
#include "cpu/cross_entropy_kernel.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace nnk {
namespace cpu {

template <class T>
const CrossEntropyKernels<T>& active_cross_entropy_kernels() {
  switch (active_isa()) {
#if defined(NNK_X86)
    case Isa::avx512:
      return cross_entropy_kernels_avx512<T>();
    case Isa::avx2:
      return cross_entropy_kernels_avx2<T>();
#endif
    default:
      return cross_entropy_kernels_scalar<T>();
  }
}

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

// Gradients larger than this go out with non-temporal stores: they will not be read back from
// cache before they are evicted anyway.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

template <class T>
void forward_rows(const CrossEntropyArgs<T>& a, const CrossEntropyKernels<T>& k, double wsum,
                  bool stream, int64_t r0, int64_t r1) {
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
void cross_entropy_forward(const CrossEntropyArgs<T>& a) {
  if (a.rows == 0) return;
  double wsum = double(a.C);
  if (a.weight) {
    wsum = 0;
    for (int64_t c = 0; c < a.C; ++c) wsum += double(a.weight[c]);
  }
  const auto& k = active_cross_entropy_kernels<T>();
  const bool stream = a.grad && a.rows * a.C * int64_t(sizeof(T)) > kStreamBytes;
  // A row is C exps or so: about 16K values per task keeps the split worth its cost.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(a.C, 1));
  parallel_for(a.rows, grain,
               [&](int64_t r0, int64_t r1) { forward_rows(a, k, wsum, stream, r0, r1); });
}

#define NNK_INSTANTIATE(T)                                                                   \
  template const CrossEntropyKernels<T>& active_cross_entropy_kernels<T>();                  \
  template int64_t cross_entropy_check_targets<T>(const int64_t*, int64_t, int64_t, int64_t, \
                                                  const T*, double*);                        \
  template void cross_entropy_forward<T>(const CrossEntropyArgs<T>&);
NNK_INSTANTIATE(float)
NNK_INSTANTIATE(double)
#undef NNK_INSTANTIATE

}  // namespace cpu
}  // namespace nnk
