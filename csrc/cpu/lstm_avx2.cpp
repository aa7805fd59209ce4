// LSTM step kernels (lstm_loops.h) for AVX2 + FMA: 8 floats / 4 doubles per register.
#define NNK_ISA_AVX2 1
#include "common/simd.h"
#include "cpu/lstm_loops.h"

namespace nnk {
namespace cpu {

template <class T>
const LstmKernels<T>& lstm_kernels_avx2() {
  static constexpr LstmKernels<T> k = avx2::LstmLoops<T>::table();
  return k;
}

template const LstmKernels<float>& lstm_kernels_avx2<float>();
template const LstmKernels<double>& lstm_kernels_avx2<double>();

}  // namespace cpu
}  // namespace nnk
