// GEMM micro-kernels for AVX2 + FMA (Haswell and later, Zen): 16 ymm registers, 2 x 256-bit FMA.
// f32 6x16 and f64 6x8: 12 accumulators + 2 B vectors + 1 broadcast. kc = 384 keeps the B
// micro-panel (24 KiB) in a 32 KiB L1 and means fewer passes over C than kc = 256 (measured on
// Zen 3: 1024^3 on 2 threads, mean 147 vs 137 GFLOP/s); mc = 144 keeps the A block in L2.
#define NNK_ISA_AVX2 1
#include "common/simd.h"
#include "cpu/gemm_ukernel.h"

namespace nnk {
namespace cpu {

const GemmUKernel<float>& sgemm_ukernel_avx2() {
  static constexpr GemmUKernel<float> k =
      avx2::make_gemm_ukernel<float, 6, 2>("sgemm_avx2_6x16", 144, 384, 4080);
  return k;
}

const GemmUKernel<double>& dgemm_ukernel_avx2() {
  static constexpr GemmUKernel<double> k =
      avx2::make_gemm_ukernel<double, 6, 2>("dgemm_avx2_6x8", 72, 384, 2040);
  return k;
}

// The AVX-512 geometry on AVX2 registers (56 / 28 accumulators: it spills, it is for tests only).
const GemmUKernel<float>& sgemm_ukernel_avx2_avx512_tiles() {
  static constexpr GemmUKernel<float> k =
      avx2::make_gemm_ukernel<float, Avx512Tiles::mr, Avx512Tiles::s_nr / 8>(
          "sgemm_avx2_14x32_test", Avx512Tiles::s_mc, Avx512Tiles::s_kc, Avx512Tiles::s_nc);
  return k;
}

const GemmUKernel<double>& dgemm_ukernel_avx2_avx512_tiles() {
  static constexpr GemmUKernel<double> k =
      avx2::make_gemm_ukernel<double, Avx512Tiles::mr, Avx512Tiles::d_nr / 4>(
          "dgemm_avx2_14x16_test", Avx512Tiles::d_mc, Avx512Tiles::d_kc, Avx512Tiles::d_nc);
  return k;
}

}  // namespace cpu
}  // namespace nnk
