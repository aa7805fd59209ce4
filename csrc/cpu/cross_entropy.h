// Fused softmax-cross-entropy (the interface of both backends): one kernel reads each row of logits once for the loss
// (online max and sum-exp) and, when asked, writes the row's gradient right after, so the
// backward only scales it. torch.nn.functional.cross_entropy's options: class-index or
// probability targets, class weights, ignore_index, label smoothing.
#pragma once
#include <cstdint>

#include "common/tensor.h"

namespace nnk {

// One call over `rows` rows of logits, shared by both backends. Pointers hold `dtype` (float32 /
// float64 on the CPU; float32 / float16 / bfloat16 on CUDA, with float32 math), except target.
struct CrossEntropyArgs {
  const void* x = nullptr;  // logits (rows, C), row i at x + i * ldx, classes unit-stride
  DType dtype = DType::f32;
  int64_t rows = 0, C = 0, ldx = 0;
  const int64_t* target = nullptr;  // (rows,) class indices in [0, C) or ignore_index; or null
  int64_t ignore_index = -100;
  const void* soft = nullptr;  // (rows, C) target probabilities at soft + i * ldt (when no target)
  int64_t ldt = 0;
  const void* weight = nullptr;  // (C,) class weights or null
  double smoothing = 0;          // label smoothing in [0, 1]
  void* loss = nullptr;          // out (rows,): each row's loss (weighted, not reduced)
  void* grad = nullptr;  // out (rows, C) at grad + i * ldg, or null: d(sum_i loss_i)/dx * scale
  int64_t ldg = 0;
  double grad_scale = 1;
  // CUDA only: a device scalar; the gradient's scale is then grad_scale / *grad_scale_divisor (the
  // 'mean' denominator, without a host sync).
  const float* grad_scale_divisor = nullptr;
};

namespace cpu {

// The index of the first target outside [0, C) that is not ignore_index, or -1; *total gets
// sum over the other rows of weight[target] (1 without weights): the 'mean' denominator.
template <class T>
int64_t cross_entropy_check_targets(const int64_t* target, int64_t rows, int64_t C,
                                    int64_t ignore_index, const T* weight, double* total);

// T is a.dtype's type.
template <class T>
void cross_entropy_forward(const CrossEntropyArgs& a);

}  // namespace cpu

// The CUDA backend (cuda/cross_entropy.cu): the same pass, on `stream` of `device`.
namespace cuda {
void cross_entropy_forward(const CrossEntropyArgs& a, int device, void* stream);
}  // namespace cuda
}  // namespace nnk
