// Cross-entropy row loops (cross_entropy_loops.h) for AVX-512: 16 floats / 8 doubles per register.
#define NNK_ISA_AVX512 1
#include "common/simd.h"
#include "cpu/cross_entropy_loops.h"

namespace nnk {
namespace cpu {

template <class T>
const CrossEntropyKernels<T>& cross_entropy_kernels_avx512() {
  static constexpr CrossEntropyKernels<T> k = avx512::CrossEntropyLoops<T>::table();
  return k;
}

template const CrossEntropyKernels<float>& cross_entropy_kernels_avx512<float>();
template const CrossEntropyKernels<double>& cross_entropy_kernels_avx512<double>();

}  // namespace cpu
}  // namespace nnk
