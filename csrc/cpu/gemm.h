// The project's one GEMM on the CPU (arguments: common/gemm_args.h). Linear, conv2d and LSTM
// all call this.
//
// Design (BLIS): pack A into MR-row panels and B into NR-column panels, block for the caches
// (A block mc x kc in L2, B micro-panel kc x NR streamed from L2, B block kc x nc in L3), run a
// register-blocked MR x NR micro-kernel per ISA (AVX-512 / AVX2+FMA / baseline), threads split the
// C tiles.
// gemm.cpp holds both: the micro-kernels (compiled once per ISA) and the driver (compiled once).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "common/gemm_args.h"

namespace nnk {
namespace cpu {

// Runs on up to `nthreads` threads (0: nnk::num_threads(); always 1 inside a parallel region).
// Packing workspace comes from a buffer owned by the calling thread and kept for reuse.
// Throws std::bad_alloc if that buffer cannot grow; call it outside parallel regions, or size a
// workspace yourself with gemm_workspace() and pass it.
template <class T>
void gemm(const Gemm<T>& g, int nthreads = 0);
template <class T>
size_t gemm_workspace(const Gemm<T>& g, int nthreads);  // in elements of T
template <class T>
void gemm(const Gemm<T>& g, int nthreads, T* workspace);

// `batch` independent products: item b uses A + b*sa, B + b*sb, C + b*sc (sa or sb may be 0 to
// broadcast an operand; the biases are shared). Small items run in parallel across the batch,
// large ones one after another with all threads each. workspace: nullptr, or with nthreads == 1
// room for gemm_workspace(g, 1) elements (a caller inside its own parallel region, where scratch
// must not be allocated).
template <class T>
void gemm_batched(const Gemm<T>& g, int64_t batch, int64_t sa, int64_t sb, int64_t sc,
                  int nthreads = 0, T* workspace = nullptr);

// An operand B (K x N, any strides) multiplied many times is packed once: gemm_pack_b writes
// gemm_packed_b_size(K, N) elements, which products then take as Gemm::packed_b, skipping B's
// packing and the barriers around it. The layout is the active micro-kernel's: pack and multiply
// within one call into the library (the ISA must not change in between).
template <class T>
size_t gemm_packed_b_size(int64_t K, int64_t N);  // in elements of T
template <class T>
void gemm_pack_b(int64_t K, int64_t N, const T* B, int64_t rsb, int64_t csb, T* dst,
                 int nthreads = 0);

// Name of the micro-kernel the active ISA runs, e.g. "sgemm_avx2_6x16".
template <class T>
const char* gemm_kernel_name();

constexpr int kMaxMR = 14;  // largest mr of any kernel

// ------------------------------------------------------------------------ bfloat16 operands
// C (M x N) = alpha * A (M x K) . B (K x N) + beta * C + biases on bfloat16 A and B (raw
// 16-bit words), float32 accumulation, C float32 or bfloat16 (rounded to nearest even), any
// strides (gemm_bf16.cpp: an AMX, an AVX512_BF16 and a widening kernel).
struct GemmBf16 {
  int64_t M = 0, N = 0, K = 0;
  const uint16_t* A = nullptr;
  int64_t rsa = 0, csa = 0;
  const uint16_t* B = nullptr;
  int64_t rsb = 0, csb = 0;
  void* C = nullptr;  // float* or, when c_bf16, uint16_t*
  int64_t rsc = 0, csc = 0;
  bool c_bf16 = false;
  float alpha = 1, beta = 0;
  const float* bias_n = nullptr;  // (N,) added to column j, or null
  const float* bias_m = nullptr;  // (M,) added to row i, or null

  // Optional: A as runs of 32 contiguous values at offsets, A(i, k) = A[a_rows[i] + a_runs[k / 32]
  // + k % 32] (rsa, csa ignored; K a multiple of 32; a_rows has ceil(M / 32) * 32 entries, those
  // past M any readable offset): conv2d's windows in a zero-padded channels-last copy of the
  // images, row i an output pixel, run (tap, 32 channels). Read in place on AVX512_BF16.
  const int64_t* a_rows = nullptr;
  const int64_t* a_runs = nullptr;
  // Optional: B likewise, B(k, j) = B[b_rows[k] + b_runs[j / 32] + j % 32] (rsb, csb ignored; N a
  // multiple of 32): the same windows as the weight gradient's B.
  const int64_t* b_rows = nullptr;
  const int64_t* b_runs = nullptr;
};
// Call outside parallel regions (packing workspace: thread_scratch).
void gemm_bf16(const GemmBf16& g, int nthreads = 0);
// out[j * so] = sum_i x[i * rsx + j * csx] (R x N bfloat16, float32 sums).
void sum_rows_bf16(int64_t R, int64_t N, const uint16_t* x, int64_t rsx, int64_t csx, uint16_t* out,
                   int64_t so);
inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even, NaN kept quiet (torch's c10::BFloat16 conversion).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
// dst[i] = src[i * step] (widen) / dst[i * step] = src[i] (round) for i < n, converted as above
// (unit steps on AVX-512 where the active ISA is).
void bf16_to_f32_n(const uint16_t* src, float* dst, int64_t n, int64_t step = 1);
void f32_to_bf16_n(const float* src, uint16_t* dst, int64_t n, int64_t step = 1);
// "bf16gemm_amx_32x32", "bf16gemm_avx512bf16_8x32" or "bf16gemm_widen_f32": what gemm_bf16 runs
// (widen unless the active ISA is avx512).
const char* gemm_bf16_kernel_name();
// Test hook: run at most the named kernel (false, nothing changed, when the CPU lacks it); ""
// goes back to the best.
bool set_gemm_bf16_kernel(const char* name);

// ----------------------------------------------------------------- the micro-kernel contract
// Only this differs per ISA: block sizes plus the function pointers below. Blocking, threading and
// edge handling are written once in the driver.
template <class T>
struct GemmUKernel {
  const char* name;  // "<s|d>gemm_<isa>_<MR>x<NR>"
  int mr, nr;        // register tile of C
  // Cache blocks, the largest the driver uses: A block mc x kc (L2; fewer rows on a small L2),
  // B micro-panel kc x nr (streamed from L2), B block kc x nc (L3).
  int mc, kc, nc;

  // Full mr x nr tile from a packed A panel a (kc x mr) and B rows of nr values, rsb apart (a
  // packed panel: rsb = nr; or B itself when it is row-major):
  //   C[i*rsc + j] = alpha * sum_k a[k*mr + i] * b[k*rsb + j] + beta * C[i*rsc + j]
  //                  (+ bias_m[i]) (+ bias_n[j]);  beta == 0: C is not read.
  void (*tile)(int64_t kc, const T* a, const T* b, int64_t rsb, T* c, int64_t rsc, T alpha, T beta,
               const T* bias_m, const T* bias_n);
  // The same with A read in place: A(i, k) = a[row(i) + col(k)], row(i) = rows ? rows[i] : i*rsa,
  // col(k) = cols ? cols[k] : k*csa (Gemm::a_rows, a_cols; all mr rows must exist).
  void (*tile_strided_a)(int64_t kc, const T* a, int64_t rsa, int64_t csa, const int64_t* rows,
                         const int64_t* cols, const T* b, int64_t rsb, T* c, int64_t rsc, T alpha,
                         T beta, const T* bias_m, const T* bias_n);
  // A[i*rsa + p*csa] for i < m, p < k  ->  ceil(m/mr) panels of k*mr, rows past m zeroed.
  void (*pack_a)(int64_t m, int64_t k, const T* a, int64_t rsa, int64_t csa, T* dst);
  // B[p*rsb + j*csb] for p < k, j < n  ->  ceil(n/nr) panels of k*nr, columns past n zeroed.
  void (*pack_b)(int64_t k, int64_t n, const T* b, int64_t rsb, int64_t csb, T* dst);
  // FMA-throughput probe with the kernel's register budget; returns flops executed (see peak.cpp).
  int64_t (*fma_loop)(int64_t iters, T* sink);
  // Products with at most kDotCols columns whose A rows and B columns are both contiguous in k
  // (Linear at batch <= 4, computed as W . X^T): dot products instead of tiles, which would
  // compute NR columns for n. Rows [0, m) of
  //   C[i*rsc + j*csc] = alpha * sum_p a[i*rsa + p] * b[j*csb + p] + beta * C (+ biases), j < n.
  void (*dot_rows)(int64_t m, int64_t k, int64_t n, const T* a, int64_t rsa, const T* b,
                   int64_t csb, T* c, int64_t rsc, int64_t csc, T alpha, T beta, const T* bias_m,
                   const T* bias_n);
  // dst[j*ldd + i] = src[i*lds + j] for i < m, j < n (register blocks): layout changes around
  // the GEMMs (conv2d's channels-last copies).
  void (*transpose)(int64_t m, int64_t n, const T* src, int64_t lds, T* dst, int64_t ldd);
  // Edge tiles of r < mr rows ([r], 1 <= r < mr): tile and tile_strided_a for rows i < r only (a
  // packed panel keeps its mr stride), so the last tile of M = 32 on a 14-row kernel computes 4
  // rows, not 14, and stores them straight to C.
  decltype(tile) tile_rows[kMaxMR];
  decltype(tile_strided_a) tile_strided_a_rows[kMaxMR];
};

// The table of the active ISA (common/isa.h); peak.cpp runs its fma_loop.
template <class T>
const GemmUKernel<T>& active_gemm_ukernel();

constexpr int kMaxTileElems = 512;  // largest mr*nr of any kernel (14x32)
constexpr int kDotCols = 4;         // GemmUKernel::dot_rows: at most this many columns

// AVX-512 tiles and cache blocks (gemm.cpp). The avx2 pass also builds the same template at
// this geometry, reachable only through set_emulated_avx512_tiles(), so machines without AVX-512
// test every driver path the AVX-512 kernels take (MR = 14, NR = 32 / 16, their blocks).
struct Avx512Tiles {
  static constexpr int mr = 14;
  static constexpr int s_nr = 32, s_mc = 336, s_kc = 1024, s_nc = 4096;  // float
  static constexpr int d_nr = 16, d_mc = 168, d_kc = 512, d_nc = 2048;   // double
};
// Test hook: while on (and the active ISA is avx2), the AVX2 kernels run at the AVX-512 geometry.
void set_emulated_avx512_tiles(bool on);
bool emulated_avx512_tiles();

}  // namespace cpu
}  // namespace nnk
