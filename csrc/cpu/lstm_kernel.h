// The fused pointwise kernels of one LSTM time step (common/lstm_args.h: LstmStep), one table per
// ISA (lstm_<isa>.cpp, written once in lstm_loops.h); lstm.cpp runs the sequence.
#pragma once
#include <cstdint>

#include "common/lstm_args.h"

namespace nnk {
namespace cpu {

template <class T>
struct LstmKernels {
  // Rows [b0, b1) of the step.
  void (*forward_rows)(const LstmStep<T>& s, int64_t b0, int64_t b1);
  void (*backward_rows)(const LstmStep<T>& s, int64_t b0, int64_t b1);
};

template <class T>
const LstmKernels<T>& active_lstm_kernels();

template <class T>
const LstmKernels<T>& lstm_kernels_scalar();
#if defined(NNK_X86)
template <class T>
const LstmKernels<T>& lstm_kernels_avx2();
template <class T>
const LstmKernels<T>& lstm_kernels_avx512();
#endif

}  // namespace cpu
}  // namespace nnk
