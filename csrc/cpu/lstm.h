// LSTM on the CPU: one layer in one direction over a whole sequence (arguments and math:
// common/lstm_args.h; the time loop: common/lstm_driver.h). The GEMMs are the project's GEMM
// (cpu/gemm.h), the recurrent weight packed once per call; the pointwise part of each step is one
// fused kernel per ISA (lstm.cpp) over the batch rows, split across threads.
#pragma once
#include "common/lstm_args.h"

namespace nnk {
namespace cpu {

// Throws std::bad_alloc when the packing scratch cannot grow (call outside parallel regions).
template <class T>
void lstm_layer_forward(const LstmLayer<T>& a);
template <class T>
void lstm_layer_backward(const LstmLayer<T>& a);

}  // namespace cpu

// The CUDA backend (cuda/lstm.cu), float32: the same time loop, the project's CUDA GEMM and one
// fused step kernel per step.
namespace cuda {
void lstm_layer_forward(const LstmLayer<float>& a, int device, void* stream);
void lstm_layer_backward(const LstmLayer<float>& a, int device, void* stream);
}  // namespace cuda
}  // namespace nnk
