// Fused softmax-cross-entropy on the CPU: one kernel reads each row of logits once for the loss
// (online max and sum-exp) and, when asked, writes the row's gradient right after, so the
// backward only scales it. torch.nn.functional.cross_entropy's options: class-index or
// probability targets, class weights, ignore_index, label smoothing.
#pragma once
#include <cstdint>

namespace nnk {
namespace cpu {

template <class T>
struct CrossEntropyArgs {
  const T* x = nullptr;  // logits (rows, C), row i at x + i * ldx, classes unit-stride
  int64_t rows = 0, C = 0, ldx = 0;
  const int64_t* target = nullptr;  // (rows,) class indices in [0, C) or ignore_index; or null
  int64_t ignore_index = -100;
  const T* soft = nullptr;  // (rows, C) target probabilities at soft + i * ldt (when no target)
  int64_t ldt = 0;
  const T* weight = nullptr;  // (C,) class weights or null
  double smoothing = 0;       // label smoothing in [0, 1]
  T* loss = nullptr;          // out (rows,): each row's loss (weighted, not reduced)
  T* grad = nullptr;  // out (rows, C) at grad + i * ldg, or null: d(sum_i loss_i)/dx * scale
  int64_t ldg = 0;
  double grad_scale = 1;
};

// The index of the first target outside [0, C) that is not ignore_index, or -1; *total gets
// sum over the other rows of weight[target] (1 without weights): the 'mean' denominator.
template <class T>
int64_t cross_entropy_check_targets(const int64_t* target, int64_t rows, int64_t C,
                                    int64_t ignore_index, const T* weight, double* total);

template <class T>
void cross_entropy_forward(const CrossEntropyArgs<T>& a);

}  // namespace cpu
}  // namespace nnk
