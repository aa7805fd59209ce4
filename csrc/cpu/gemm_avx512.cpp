// GEMM micro-kernels for AVX-512F (Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4): 32 zmm registers,
// 2 x 512-bit FMA. f32 14x32 and f64 14x16: 28 accumulators + 2 B vectors. kc = 192 keeps the B
// micro-panel (kc x 32 floats = 24 KiB) in a 32-48 KiB L1; mc = 336 keeps the A block (258 KiB) in
// L2.
#define NNK_ISA_AVX512 1
#include "common/simd.h"
#include "cpu/gemm_ukernel.h"

namespace nnk {
namespace cpu {

const GemmUKernel<float>& sgemm_ukernel_avx512() {
  static constexpr GemmUKernel<float> k =
      avx512::make_gemm_ukernel<float, Avx512Tiles::mr, Avx512Tiles::s_nr / 16>(
          "sgemm_avx512_14x32", Avx512Tiles::s_mc, Avx512Tiles::s_kc, Avx512Tiles::s_nc);
  return k;
}

const GemmUKernel<double>& dgemm_ukernel_avx512() {
  static constexpr GemmUKernel<double> k =
      avx512::make_gemm_ukernel<double, Avx512Tiles::mr, Avx512Tiles::d_nr / 8>(
          "dgemm_avx512_14x16", Avx512Tiles::d_mc, Avx512Tiles::d_kc, Avx512Tiles::d_nc);
  return k;
}

}  // namespace cpu
}  // namespace nnk
