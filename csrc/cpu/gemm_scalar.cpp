// GEMM micro-kernels for Portable path: 16-byte GCC/Clang vectors (SSE2 on any x86-64, NEON on
// aarch64), no ISA flags. f32 6x8 and f64 6x4: 12 accumulators + 2 B vectors of 16 registers.
#define NNK_ISA_SCALAR 1
#include "common/simd.h"
#include "cpu/gemm_ukernel.h"

namespace nnk {
namespace cpu {

const GemmUKernel<float>& sgemm_ukernel_scalar() {
  static constexpr GemmUKernel<float> k =
      scalar::make_gemm_ukernel<float, 6, 2>("sgemm_scalar_6x8", 120, 256, 2048);
  return k;
}

const GemmUKernel<double>& dgemm_ukernel_scalar() {
  static constexpr GemmUKernel<double> k =
      scalar::make_gemm_ukernel<double, 6, 2>("dgemm_scalar_6x4", 120, 256, 2048);
  return k;
}

}  // namespace cpu
}  // namespace nnk
