// Batch normalization (the interface of both backends): per-channel statistics, normalisation and their gradients over
// an (N, C, S) view of the input (S = the flattened spatial dims: 1 for (N, C), L, or H*W).
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
#pragma once
#include <cstdint>

namespace nnk {
namespace cpu {

template <class T>
struct View3 {
  T* p = nullptr;
  int64_t N = 0, C = 0, S = 0;
  int64_t sn = 0, sc = 0, ss = 0;  // element strides of n, c, s
};

// With S == 1 ((N, C) inputs) the batch dim is taken as the spatial one: (1, C, N), ss = sn.
// Applied to every operand of a call (it depends on the shape only), it gives the kernels one row
// of N values per channel, or N pixels of C channels. (The CUDA kernels use it too.)
template <class T>
inline View3<T> normalised(View3<T> v) {
  if (v.S == 1 && v.N != 1) {
    v.S = v.N;
    v.ss = v.sn;
    v.N = 1;
    v.sn = 0;
  }
  return v;
}

// Per channel: count = N*S, mean, and m2 = sum (x - mean)^2.
template <class T>
void batch_norm_stats(View3<const T> x, T* mean, T* m2);

// y = (x - center[c]) * scale[c] + shift[c] (center null: 0).
template <class T>
void batch_norm_apply(View3<const T> x, View3<T> y, const T* center, const T* scale,
                      const T* shift);

// Training forward, fused: statistics then normalisation per channel. Writes save_mean,
// save_invstd (1 / sqrt(var + eps), biased var) and, when running_mean / running_var are given,
// running = (1 - momentum) * running + momentum * batch (unbiased variance).
template <class T>
void batch_norm_forward_train(View3<const T> x, View3<T> y, const T* w, const T* b, double eps,
                              double momentum, T* save_mean, T* save_invstd, T* running_mean,
                              T* running_var);

// Per channel: sum_dy = sum dy, sum_dy_xhat = sum dy * (x - mean) * invstd.
template <class T>
void batch_norm_backward_reduce(View3<const T> dy, View3<const T> x, const T* mean, const T* invstd,
                                T* sum_dy, T* sum_dy_xhat);

// dx = (dy - mean_dy[c] - xhat * mean_dy_xhat[c]) * invstd[c] * w[c] (w null: 1).
template <class T>
void batch_norm_backward_apply(View3<const T> dy, View3<const T> x, const T* mean, const T* invstd,
                               const T* w, const T* mean_dy, const T* mean_dy_xhat, View3<T> dx);

// Training backward, fused: the reduction then dx per channel. dx may be null (no input
// gradient); dw, db receive sum dy * xhat and sum dy (either may be null).
template <class T>
void batch_norm_backward_train(View3<const T> dy, View3<const T> x, const T* mean, const T* invstd,
                               const T* w, View3<T> dx, T* dw, T* db);

}  // namespace cpu

// The CUDA backend (cuda/batch_norm.cu), float32, the same operations. Every view of a call has
// unit-stride rows (ss == 1) or channels innermost (sc == 1), the same for all of them. ws: a
// workspace of C * kBatchNormParts * 2 doubles for the partial sums of the reductions.
namespace cuda {
constexpr int kBatchNormParts = 64;
void batch_norm_forward_train(cpu::View3<const float> x, cpu::View3<float> y, const float* w,
                              const float* b, double eps, double momentum, float* save_mean,
                              float* save_invstd, float* running_mean, float* running_var,
                              double* ws, int device, void* stream);
void batch_norm_stats(cpu::View3<const float> x, float* mean, float* m2, double* ws, int device,
                      void* stream);
void batch_norm_apply(cpu::View3<const float> x, cpu::View3<float> y, const float* center,
                      const float* scale, const float* shift, int device, void* stream);
void batch_norm_backward_reduce(cpu::View3<const float> dy, cpu::View3<const float> x,
                                const float* mean, const float* invstd, float* sum_dy,
                                float* sum_dy_xhat, double* ws, int device, void* stream);
void batch_norm_backward_apply(cpu::View3<const float> dy, cpu::View3<const float> x,
                               const float* mean, const float* invstd, const float* w,
                               const float* mean_dy, const float* mean_dy_xhat,
                               cpu::View3<float> dx, int device, void* stream);
// dx.p null: dw and db only.
void batch_norm_backward_train(cpu::View3<const float> dy, cpu::View3<const float> x,
                               const float* mean, const float* invstd, const float* w,
                               cpu::View3<float> dx, float* dw, float* db, double* ws, int device,
                               void* stream);
}  // namespace cuda
}  // namespace nnk
