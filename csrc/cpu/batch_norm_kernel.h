// The inner loops of batch normalization, one table per ISA (batch_norm_<isa>.cpp, written once in
// batch_norm_loops.h); batch_norm.cpp does the threading, the statistics and the dispatch.
//
// Row loops take n unit-stride values of one channel (a row of the (N, C, S) view, S = H*W).
// Pixel loops take P pixels of C unit-stride channel values each, pixel p at x + p*ldx
// (channels_last and (N, C) inputs); per-channel coefficients are arrays of C.
// Sums accumulate in T vector lanes and are returned in float64; the pixel loops flush their lanes
// to float64 at least every 256 pixels, so no lane sums more than a few hundred values.
#pragma once
#include <cstdint>

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

// The table of the active ISA (common/isa.h).
template <class T>
const BatchNormKernels<T>& active_batch_norm_kernels();

// Per ISA (batch_norm_<isa>.cpp), instantiated for float and double.
template <class T>
const BatchNormKernels<T>& batch_norm_kernels_scalar();
#if defined(NNK_X86)
template <class T>
const BatchNormKernels<T>& batch_norm_kernels_avx2();
template <class T>
const BatchNormKernels<T>& batch_norm_kernels_avx512();
#endif

}  // namespace cpu
}  // namespace nnk
