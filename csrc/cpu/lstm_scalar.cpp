// LSTM step kernels (lstm_loops.h) for the portable path: 16-byte GCC/Clang vectors.
#define NNK_ISA_SCALAR 1
#include "common/simd.h"
#include "cpu/lstm_loops.h"

namespace nnk {
namespace cpu {

template <class T>
const LstmKernels<T>& lstm_kernels_scalar() {
  static constexpr LstmKernels<T> k = scalar::LstmLoops<T>::table();
  return k;
}

template const LstmKernels<float>& lstm_kernels_scalar<float>();
template const LstmKernels<double>& lstm_kernels_scalar<double>();

}  // namespace cpu
}  // namespace nnk
