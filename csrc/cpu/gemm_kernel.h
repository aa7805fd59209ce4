// The contract between the ISA-neutral GEMM driver (gemm.cpp) and the per-ISA units
// (gemm_avx512.cpp, gemm_avx2.cpp, gemm_scalar.cpp): block sizes plus three function pointers.
// Only these differ per ISA; blocking, threading and edge handling are written once in the driver.
#pragma once
#include <cstdint>

namespace nnk {
namespace cpu {

template <class T>
struct GemmUKernel {
  const char* name;  // "<s|d>gemm_<isa>_<MR>x<NR>"
  int mr, nr;        // register tile of C
  int mc, kc,
      nc;  // cache blocks: A block mc x kc (L2), B micro-panel kc x nr (L1), B block kc x nc (L3)

  // Full mr x nr tile from a packed A panel a (kc x mr) and B rows of nr values, rsb apart (a
  // packed panel: rsb = nr; or B itself when it is row-major):
  //   C[i*rsc + j] = alpha * sum_k a[k*mr + i] * b[k*rsb + j] + beta * C[i*rsc + j]
  //                  (+ bias_m[i]) (+ bias_n[j]);  beta == 0: C is not read.
  void (*tile)(int64_t kc, const T* a, const T* b, int64_t rsb, T* c, int64_t rsc, T alpha, T beta,
               const T* bias_m, const T* bias_n);
  // The same with A read in place: A(i, k) = a[i*rsa + k*csa] (all mr rows must exist).
  void (*tile_strided_a)(int64_t kc, const T* a, int64_t rsa, int64_t csa, const T* b, int64_t rsb,
                         T* c, int64_t rsc, T alpha, T beta, const T* bias_m, const T* bias_n);
  // A[i*rsa + p*csa] for i < m, p < k  ->  ceil(m/mr) panels of k*mr, rows past m zeroed.
  void (*pack_a)(int64_t m, int64_t k, const T* a, int64_t rsa, int64_t csa, T* dst);
  // B[p*rsb + j*csb] for p < k, j < n  ->  ceil(n/nr) panels of k*nr, columns past n zeroed.
  void (*pack_b)(int64_t k, int64_t n, const T* b, int64_t rsb, int64_t csb, T* dst);
  // FMA-throughput probe with the kernel's register budget; returns flops executed (see peak.cpp).
  int64_t (*fma_loop)(int64_t iters, T* sink);
};

// The table of the active ISA (common/isa.h).
template <class T>
const GemmUKernel<T>& active_gemm_ukernel();

constexpr int kMaxTileElems = 512;  // largest mr*nr of any kernel (14x32)

// AVX-512 tiles and cache blocks (gemm_avx512.cpp). The AVX2 unit also builds the same template at
// this geometry, reachable only through set_emulated_avx512_tiles(), so machines without AVX-512
// test every driver path the AVX-512 kernels take (MR = 14, NR = 32 / 16, their blocks).
struct Avx512Tiles {
  static constexpr int mr = 14;
  static constexpr int s_nr = 32, s_mc = 336, s_kc = 192, s_nc = 4096;  // float
  static constexpr int d_nr = 16, d_mc = 168, d_kc = 192, d_nc = 2048;  // double
};
// Test hook: while on (and the active ISA is avx2), the AVX2 kernels run at the AVX-512 geometry.
void set_emulated_avx512_tiles(bool on);
bool emulated_avx512_tiles();

const GemmUKernel<float>& sgemm_ukernel_scalar();
const GemmUKernel<double>& dgemm_ukernel_scalar();
#if defined(NNK_X86)
const GemmUKernel<float>& sgemm_ukernel_avx2();
const GemmUKernel<double>& dgemm_ukernel_avx2();
const GemmUKernel<float>& sgemm_ukernel_avx2_avx512_tiles();
const GemmUKernel<double>& dgemm_ukernel_avx2_avx512_tiles();
const GemmUKernel<float>& sgemm_ukernel_avx512();
const GemmUKernel<double>& dgemm_ukernel_avx512();
#endif

}  // namespace cpu
}  // namespace nnk
