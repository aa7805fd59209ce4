// The row loops of the fused softmax-cross-entropy, one table per ISA (cross_entropy_<isa>.cpp,
// written once in cross_entropy_loops.h); cross_entropy.cpp does the rows, threads and the loss.
//
// A row is n = C unit-stride logits x; w (nullable) the C class weights, t (nullable) the row's C
// target probabilities.
#pragma once
#include <cstdint>

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

template <class T>
const CrossEntropyKernels<T>& active_cross_entropy_kernels();

template <class T>
const CrossEntropyKernels<T>& cross_entropy_kernels_scalar();
#if defined(NNK_X86)
template <class T>
const CrossEntropyKernels<T>& cross_entropy_kernels_avx2();
template <class T>
const CrossEntropyKernels<T>& cross_entropy_kernels_avx512();
#endif

}  // namespace cpu
}  // namespace nnk
