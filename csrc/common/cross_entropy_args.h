// The arguments of one fused softmax-cross-entropy call, shared by the CPU (cpu/cross_entropy.cpp)
// and CUDA (cuda/cross_entropy.cu) kernels and their binding.
#pragma once
#include <cstdint>

#include "common/tensor.h"

namespace nnk {

// One call over `rows` rows of logits. Pointers hold `dtype` (float32 /
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

}  // namespace nnk
