// Cross-entropy row loops (cross_entropy_loops.h) for the portable path: 16-byte GCC/Clang vectors.
#define NNK_ISA_SCALAR 1
#include "common/simd.h"
#include "cpu/cross_entropy_loops.h"

namespace nnk {
namespace cpu {

template <class T>
const CrossEntropyKernels<T>& cross_entropy_kernels_scalar() {
  static constexpr CrossEntropyKernels<T> k = scalar::CrossEntropyLoops<T>::table();
  return k;
}

template const CrossEntropyKernels<float>& cross_entropy_kernels_scalar<float>();
template const CrossEntropyKernels<double>& cross_entropy_kernels_scalar<double>();

}  // namespace cpu
}  // namespace nnk
