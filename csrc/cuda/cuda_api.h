// Host-side entry points of the CUDA kernels, callable from the C++ bindings (compiled by the host
// compiler, no CUDA headers needed). Every launch goes on the stream the caller passes (torch's
// current stream) on the given device; errors are thrown as std::runtime_error.
#pragma once
#include <cstdint>
#include <string>

#include "common/gemm_args.h"
#include "common/lstm_args.h"
#include "common/tensor.h"
#include "cpu/batch_norm.h"
#include "cuda/conv2d_index.cuh"

namespace nnk {
namespace cuda {

// runtime.cu
int device_count();            // 0 when there is no driver or no GPU; never throws
std::string compiled_archs();  // e.g. "80,90"

// gemm.cu: `batch` products, item b at A + b*sa, B + b*sb, C + b*sc (see common/gemm_args.h).
void sgemm(const Gemm<float>& g, int64_t batch, int64_t sa, int64_t sb, int64_t sc, int device,
           void* stream);

// conv2d.cu: implicit-GEMM convolution (shapes and strides in ix, conv2d_index.cuh). The
// weight's (C/groups, R, S) dims, and the pixels of y / dx / dy, must flatten.
void conv2d_forward(const ConvIndex& ix, const float* x, const float* w, const float* bias,
                    float* y, int device, void* stream);
void conv2d_backward_data(const ConvIndex& ix, const float* dy, const float* w, float* dx,
                          int device, void* stream);
void conv2d_backward_weight(const ConvIndex& ix, const float* x, const float* dy, float* dw,
                            float* dbias, int device, void* stream);
// out[c] = sum_{n, i} x[n*sn + c*sc + i*si].
void sum_channels(int64_t N, int64_t C, int64_t HW, const float* x, int64_t sn, int64_t sc,
                  int64_t si, float* out, int device, void* stream);

// reduce.cu: out[j*so] = sum_i x[i*rsx + j*csx], i < R, j < N.
void sum_rows(int64_t R, int64_t N, const float* x, int64_t rsx, int64_t csx, float* out,
              int64_t so, int device, void* stream);

// batch_norm.cu (fp32; the operations of cpu/batch_norm.h). Every view of a call has unit-stride
// rows (ss == 1) or channels innermost (sc == 1), the same for all of them. ws: workspace of
// C * kBatchNormParts * 2 doubles for the partial sums of the reductions.
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

// cross_entropy.cu: the fused softmax-cross-entropy of cpu/cross_entropy.h with fp32 math on
// float32, float16 or bfloat16 storage (dtype); every pointer below holds that dtype except target.
struct CrossEntropyArgs {
  const void* x = nullptr;  // (rows, C), row i at x + i * ldx elements, classes unit-stride
  DType dtype = DType::f32;
  int64_t rows = 0, C = 0, ldx = 0;
  const int64_t* target = nullptr;  // (rows,) or null (then soft)
  int64_t ignore_index = -100;
  const void* soft = nullptr;  // (rows, C) at soft + i * ldt
  int64_t ldt = 0;
  const void* weight = nullptr;  // (C,) or null
  float smoothing = 0;
  void* loss = nullptr;  // (rows,)
  void* grad = nullptr;  // (rows, C) at grad + i * ldg, or null
  int64_t ldg = 0;
  float grad_scale = 1;
  const float* grad_scale_divisor = nullptr;  // device scalar or null: grad_scale / *divisor
};
void cross_entropy_forward(const CrossEntropyArgs& a, int device, void* stream);

// lstm.cu: one LSTM layer in one direction over a sequence (common/lstm_args.h), fp32.
void lstm_layer_forward(const LstmLayer<float>& a, int device, void* stream);
void lstm_layer_backward(const LstmLayer<float>& a, int device, void* stream);

}  // namespace cuda
}  // namespace nnk
