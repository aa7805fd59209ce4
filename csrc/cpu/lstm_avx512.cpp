// LSTM step kernels (lstm_loops.h) for AVX-512: 16 floats / 8 doubles per register.
#define NNK_ISA_AVX512 1
#include "common/simd.h"
#include "cpu/lstm_loops.h"

namespace nnk {
namespace cpu {

template <class T>
const LstmKernels<T>& lstm_kernels_avx512() {
  static constexpr LstmKernels<T> k = avx512::LstmLoops<T>::table();
  return k;
}

template const LstmKernels<float>& lstm_kernels_avx512<float>();
template const LstmKernels<double>& lstm_kernels_avx512<double>();

}  // namespace cpu
}  // namespace nnk
