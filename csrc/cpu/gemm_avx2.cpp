// GEMM micro-kernels for AVX2 + FMA (Haswell and later, Zen): 16 ymm registers, 2 x 256-bit FMA.
// f32 6x16 and f64 6x8: 12 accumulators + 2 B vectors + 1 broadcast. kc = 256 keeps the B
// micro-panel (16 KiB) in L1; mc = 144 keeps the A block (144 KiB) in L2.
#define NNK_ISA_AVX2 1
#include "common/simd.h"
#include "cpu/gemm_ukernel.h"

namespace nnk {
namespace cpu {

const GemmUKernel<float>& sgemm_ukernel_avx2() {
  static constexpr GemmUKernel<float> k = avx2::make_gemm_ukernel<float, 6, 2>("sgemm_avx2_6x16", 144, 256, 4080);
  return k;
}

const GemmUKernel<double>& dgemm_ukernel_avx2() {
  static constexpr GemmUKernel<double> k = avx2::make_gemm_ukernel<double, 6, 2>("dgemm_avx2_6x8", 72, 256, 2040);
  return k;
}

}  // namespace cpu
}  // namespace nnk
