// Batch-norm loops (batch_norm_loops.h) for AVX2 + FMA: 8 floats / 4 doubles per register.
#define NNK_ISA_AVX2 1
#include "common/simd.h"
#include "cpu/batch_norm_loops.h"

namespace nnk {
namespace cpu {

template <class T>
const BatchNormKernels<T>& batch_norm_kernels_avx2() {
  static constexpr BatchNormKernels<T> k = avx2::BatchNormLoops<T>::table();
  return k;
}

template const BatchNormKernels<float>& batch_norm_kernels_avx2<float>();
template const BatchNormKernels<double>& batch_norm_kernels_avx2<double>();

}  // namespace cpu
}  // namespace nnk
