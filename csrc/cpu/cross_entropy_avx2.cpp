// Cross-entropy row loops (cross_entropy_loops.h) for AVX2 + FMA: 8 floats / 4 doubles per
// register.
#define NNK_ISA_AVX2 1
#include "common/simd.h"
#include "cpu/cross_entropy_loops.h"

namespace nnk {
namespace cpu {

template <class T>
const CrossEntropyKernels<T>& cross_entropy_kernels_avx2() {
  static constexpr CrossEntropyKernels<T> k = avx2::CrossEntropyLoops<T>::table();
  return k;
}

template const CrossEntropyKernels<float>& cross_entropy_kernels_avx2<float>();
template const CrossEntropyKernels<double>& cross_entropy_kernels_avx2<double>();

}  // namespace cpu
}  // namespace nnk
