// Batch-norm loops (batch_norm_loops.h) for the portable path: 16-byte GCC/Clang vectors (SSE2 on
// x86-64, NEON on aarch64).
#define NNK_ISA_SCALAR 1
#include "common/simd.h"
#include "cpu/batch_norm_loops.h"

namespace nnk {
namespace cpu {

template <class T>
const BatchNormKernels<T>& batch_norm_kernels_scalar() {
  static constexpr BatchNormKernels<T> k = scalar::BatchNormLoops<T>::table();
  return k;
}

template const BatchNormKernels<float>& batch_norm_kernels_scalar<float>();
template const BatchNormKernels<double>& batch_norm_kernels_scalar<double>();

}  // namespace cpu
}  // namespace nnk
