// Batch-norm loops (batch_norm_loops.h) for AVX-512: 16 floats / 8 doubles per register.
#define NNK_ISA_AVX512 1
#include "common/simd.h"
#include "cpu/batch_norm_loops.h"

namespace nnk {
namespace cpu {

template <class T>
const BatchNormKernels<T>& batch_norm_kernels_avx512() {
  static constexpr BatchNormKernels<T> k = avx512::BatchNormLoops<T>::table();
  return k;
}

template const BatchNormKernels<float>& batch_norm_kernels_avx512<float>();
template const BatchNormKernels<double>& batch_norm_kernels_avx512<double>();

}  // namespace cpu
}  // namespace nnk
