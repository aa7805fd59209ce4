// The GEMM on bfloat16 operands (gemm.h, GemmBf16): float32 accumulation, a float32 or bfloat16 C.
//
// Three kernels, the best the CPU has first (gemm_bf16_kernel_name):
//   amx     AMX-BF16 tile registers (Xeon Sapphire Rapids and later). C in 32 x 32 blocks held in
//           four 16 x 16 float32 tiles; per 32 values of k two A tiles (16 rows x 32 k) and two B
//           tiles (16 k pairs x 16 columns) feed four tdpbf16ps, 32 K multiply-adds each.
//   avx512  AVX512_BF16 (Zen 4, Cooper Lake and later): vdpbf16ps on the same packed panels, a
//           block as four 8 x 32 register tiles (16 accumulators; per k pair two B vectors and one
//           broadcast A pair per row).
//   widen   every other CPU (and the AVX2 / baseline paths): A and B widened to float32 copies and
//           multiplied by the float32 GEMM, so every ISA computes bfloat16 products.
// Products of two bfloat16 values are exact in float32, so the three differ only in the order of
// the float32 sums (and amx / avx512 treat float32-denormal partial sums as zero, as oneDNN's
// kernels on the same instructions do).
//
// Packed layout (amx and avx512): K padded to a multiple of 32 with zeros, M and N to 32.
//   A panel (32 rows): row-major, rows lda apart (an AMX A tile is 16 rows x 32 k at any row
//     stride, and for vdpbf16ps the pair (k, k+1) of a row is one 32-bit word). A row-major A
//     whose K is a multiple of 32 is read in place (lda = its row stride); edge panels and other
//     layouts are packed with lda = K rounded up to 32, zeros past M and K.
//   B panel (32 columns): for each 32-k block, two subtiles (columns 0-15, 16-31) of 16 rows, row
//     p holding the pairs (B[2p][j], B[2p+1][j]) of its 16 columns - AMX's "VNNI" B tile, and one
//     vdpbf16ps operand per row.
// Linear at a small batch (B = W^T, M <= kSwapMaxRows) runs as C^T = W . X^T: W is then the A
// operand, read in place, and only the small X^T is packed (packing all of W for a few rows was
// VGG-11's 25088 -> 4096 classifier at 0.3x torch).
// The whole of A and B is packed first (each panel once, threads splitting them), then threads
// split the 32 x 32 blocks of C column panel by column panel, so a thread re-reads one B panel
// from L2 while the A panels stream.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

#include "common/isa.h"
#include "common/threading.h"
#include "common/workspace.h"
#include "cpu/gemm.h"

#if defined(NNK_X86)
// GCC 12's avx512fintrin.h trips these on its own self-initialised pass-through values (the
// per-ISA AVX-512 pass turns them off in CMake for the same reason).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace nnk {
namespace cpu {

namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

constexpr int kBlk = 32;               // C block, and the k block, in elements
constexpr int64_t kSub = 16 * 32;      // bfloat16 elements of one subtile (1 KiB)
constexpr int64_t kPanelK = 2 * kSub;  // elements of a panel per 32-k block
constexpr double kMinFlopsPerThread = 1 << 19;

enum class Kernel : int { widen = 0, avx512 = 1, amx = 2 };

// ------------------------------------------------------------------------------ kernel choice
#if defined(NNK_X86)
// AMX tile data is off until the process asks Linux for it (arch_prctl ARCH_REQ_XCOMP_PERM).
bool amx_permitted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

Kernel detect() {
  if (best_isa() != Isa::avx512) return Kernel::widen;  // also: the OS saves the AVX-512 state
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Kernel::widen;
  const bool amx = (d & (1u << 22)) && (d & (1u << 24));  // AMX-BF16, AMX-TILE
  unsigned a1 = 0, b1, c1, d1;
  __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  const bool bf16 = a1 & (1u << 5);  // AVX512_BF16
  if (!bf16) return Kernel::widen;
  if (amx && (xcr0() & (3ull << 17)) == (3ull << 17) && amx_permitted()) return Kernel::amx;
  return Kernel::avx512;
}
#else
Kernel detect() { return Kernel::widen; }
#endif

Kernel best_kernel() {
  static const Kernel k = detect();
  return k;
}
std::atomic<int> g_limit{int(Kernel::amx)};  // set_gemm_bf16_kernel's ceiling

// The kernel this call runs: the best the CPU has, at most the test hook's, and widen unless the
// active ISA is AVX-512 (NNKERNELS_ISA=avx2 then sees what an AVX2-only machine runs).
Kernel active_kernel() {
  if (active_isa() != Isa::avx512) return Kernel::widen;
  const int k = int(best_kernel()), lim = g_limit.load(std::memory_order_relaxed);
  return Kernel(k < lim ? k : lim);
}

const char* kernel_name(Kernel k) {
  switch (k) {
    case Kernel::amx:
      return "bf16gemm_amx_32x32";
    case Kernel::avx512:
      return "bf16gemm_avx512bf16_8x32";
    default:
      return "bf16gemm_widen_f32";
  }
}

// ------------------------------------------------------------------------------------ packing
// A rows [i0, i0 + 32) -> one row-major panel, rows lda (>= K, a multiple of 32) apart, zeros
// past M and K.
void pack_a_panel(const GemmBf16& g, int64_t i0, int64_t lda, uint16_t* dst) {
  const int64_t rows = min64(kBlk, g.M - i0);
  if (!g.a_rows && g.rsa == 1 && g.csa != 1) {    // A^T row-major (conv2d's W^T): k outer, so
    std::memset(dst, 0, size_t(kBlk * lda) * 2);  // each of A's lines is read once
    for (int64_t k = 0; k < g.K; ++k) {
      const uint16_t* a = g.A + i0 + k * g.csa;
      for (int64_t r = 0; r < rows; ++r) dst[r * lda + k] = a[r];
    }
    return;
  }
  for (int64_t r = 0; r < kBlk; ++r) {
    uint16_t* d = dst + r * lda;
    if (r >= rows) {
      std::memset(d, 0, size_t(lda) * 2);
      continue;
    }
    const uint16_t* a = g.A + (i0 + r) * g.rsa;
    if (g.a_rows) {  // K is a multiple of 32 (= lda)
      for (int64_t kb = 0; kb < g.K / kBlk; ++kb)
        std::memcpy(d + kb * kBlk, g.A + g.a_rows[i0 + r] + g.a_runs[kb], kBlk * 2);
      continue;
    }
    if (g.csa == 1) {
      std::memcpy(d, a, size_t(g.K) * 2);
    } else {
      for (int64_t k = 0; k < g.K; ++k) d[k] = a[k * g.csa];
    }
    std::memset(d + g.K, 0, size_t(lda - g.K) * 2);
  }
}

// B columns [j0, j0 + 32) -> one panel of (k pair, column) words (zeros past N and K).
void pack_b_panel(const GemmBf16& g, int64_t j0, int64_t kblocks, uint16_t* dst) {
  std::memset(dst, 0, size_t(kblocks * kPanelK) * 2);
  const int64_t cols = min64(kBlk, g.N - j0);
  if (g.b_rows) {
    for (int64_t k = 0; k < g.K; ++k) {
      const uint16_t* b = g.B + g.b_rows[k] + g.b_runs[j0 / kBlk];
      uint16_t* d = dst + (k / 32) * kPanelK + ((k % 32) / 2) * 32 + (k & 1);
      for (int64_t c = 0; c < cols; ++c) d[(c / 16) * kSub + (c % 16) * 2] = b[c];
    }
    return;
  }
  if (g.rsb == 1) {  // B = W^T (Linear): a pair is one 32-bit word of W's row
    for (int64_t c = 0; c < cols; ++c) {
      const uint16_t* b = g.B + (j0 + c) * g.csb;
      uint16_t* d = dst + (c / 16) * kSub + (c % 16) * 2;
      const int64_t pairs = g.K / 2;
      for (int64_t p = 0; p < pairs; ++p)  // pair p of k block p / 16 at row p % 16
        std::memcpy(d + (p / 16) * kPanelK + (p % 16) * 32, b + 2 * p, 4);
      if (g.K & 1) d[(pairs / 16) * kPanelK + (pairs % 16) * 32] = b[g.K - 1];
    }
    return;
  }
  for (int64_t k = 0; k < g.K; ++k) {
    const uint16_t* b = g.B + k * g.rsb + j0 * g.csb;
    uint16_t* d = dst + (k / 32) * kPanelK + ((k % 32) / 2) * 32 + (k & 1);
    for (int64_t c = 0; c < cols; ++c) d[(c / 16) * kSub + (c % 16) * 2] = b[c * g.csb];
  }
}

// ----------------------------------------------------------------------------------- epilogue
// C block rows [i0, i0 + m) x columns [j0, j0 + n) from the float32 block acc (32 x 32):
// alpha * acc + beta * C + bias_n[j] + bias_m[i], stored as C's dtype.
void store_block_scalar(const GemmBf16& g, const float* acc, int64_t i0, int64_t j0, int64_t m,
                        int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    const float* ai = acc + i * kBlk;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t off = (i0 + i) * g.rsc + (j0 + j) * g.csc;
      float r = g.alpha * ai[j];
      if (g.beta != 0.0f)
        r += g.beta * (g.c_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(g.C)[off])
                                : static_cast<const float*>(g.C)[off]);
      if (g.bias_n) r += g.bias_n[j0 + j];
      if (g.bias_m) r += g.bias_m[i0 + i];
      if (g.c_bf16)
        static_cast<uint16_t*>(g.C)[off] = f32_to_bf16(r);
      else
        static_cast<float*>(g.C)[off] = r;
    }
  }
}

#if defined(NNK_X86)
// 16 float32 values rounded to bfloat16 as f32_to_bf16 does (nearest even, NaN kept quiet).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256i round_bf16(__m512 r) {
  const __m512i u = _mm512_castps_si512(r);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i h =
      _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(h);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void bf16_to_f32_avx512(const uint16_t* src,
                                                                             float* dst,
                                                                             int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, src + i));
    _mm512_mask_storeu_ps(dst + i, k, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void f32_to_bf16_avx512(const float* src,
                                                                             uint16_t* dst,
                                                                             int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(dst + i, k, round_bf16(_mm512_maskz_loadu_ps(k, src + i)));
  }
}

// The same for a unit-stride C, 16 columns per vector (a mask for the last).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void store_block_avx512(const GemmBf16& g,
                                                                             const float* acc,
                                                                             int64_t i0, int64_t j0,
                                                                             int64_t m, int64_t n) {
  const __m512 alpha = _mm512_set1_ps(g.alpha), beta = _mm512_set1_ps(g.beta);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    const __m512 bias =
        g.bias_n ? _mm512_maskz_loadu_ps(k, g.bias_n + j0 + j) : _mm512_setzero_ps();
    for (int64_t i = 0; i < m; ++i) {
      __m512 r = _mm512_mul_ps(alpha, _mm512_loadu_ps(acc + i * kBlk + j));
      if (g.bias_m) r = _mm512_add_ps(r, _mm512_set1_ps(g.bias_m[i0 + i]));
      const int64_t off = (i0 + i) * g.rsc + j0 + j;
      if (g.c_bf16) {
        uint16_t* c = static_cast<uint16_t*>(g.C) + off;
        if (g.beta != 0.0f) {
          const __m512i old = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, c));
          r = _mm512_fmadd_ps(beta, _mm512_castsi512_ps(_mm512_slli_epi32(old, 16)), r);
        }
        _mm256_mask_storeu_epi16(c, k, round_bf16(_mm512_add_ps(r, bias)));
      } else {
        float* c = static_cast<float*>(g.C) + off;
        if (g.beta != 0.0f) r = _mm512_fmadd_ps(beta, _mm512_maskz_loadu_ps(k, c), r);
        _mm512_mask_storeu_ps(c, k, _mm512_add_ps(r, bias));
      }
    }
  }
}
#endif

void store_block(const GemmBf16& g, const float* acc, int64_t i0, int64_t j0, int64_t m, int64_t n,
                 bool simd) {
#if defined(NNK_X86)
  if (simd && g.csc == 1) return store_block_avx512(g, acc, i0, j0, m, n);
  if (simd && g.rsc == 1) {  // C^T unit-stride (the transposed product): store acc^T into it
    float t[kBlk * kBlk];
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) t[j * kBlk + i] = acc[i * kBlk + j];
    GemmBf16 gt = g;
    gt.rsc = g.csc, gt.csc = 1;
    gt.bias_m = g.bias_n, gt.bias_n = g.bias_m;
    return store_block_avx512(gt, t, j0, i0, n, m);
  }
#endif
  store_block_scalar(g, acc, i0, j0, m, n);
}

// ------------------------------------------------------------------------------ the kernels
// Both add the product of one K chunk (kblocks blocks of 32 k) of an A panel and a B panel to the
// 32 x 32 float32 block acc (row-major), or overwrite it when `first`.
#if defined(NNK_X86)
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: the C block's 16 x 16 float32 quarters; 4-5: A (16 rows x 32 k); 6-7: B.
__attribute__((target("amx-tile"))) void amx_begin() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // Not _tile_loadconfig: GCC 12's tells the compiler the instruction reads 8 bytes, which lets it
  // drop the stores to rows and colsb above.
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}
__attribute__((target("amx-tile"))) void amx_end() { _tile_release(); }

__attribute__((target("amx-tile,amx-bf16"))) void amx_block(const uint16_t* a, int64_t lda,
                                                            const uint16_t* b, int64_t kblocks,
                                                            float* acc, bool first) {
  constexpr int ld = kBlk * 4;  // bytes between rows of acc
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, acc, ld);
    _tile_loadd(1, acc + 16, ld);
    _tile_loadd(2, acc + 16 * kBlk, ld);
    _tile_loadd(3, acc + 16 * kBlk + 16, ld);
  }
  const uint16_t* a1 = a + 16 * lda;  // rows 16-31
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const uint16_t* bk = b + kb * kPanelK;
    _tile_loadd(4, a + kb * kBlk, lda * 2);
    _tile_loadd(6, bk, 64);
    _tile_loadd(5, a1 + kb * kBlk, lda * 2);
    _tile_loadd(7, bk + kSub, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, acc, ld);
  _tile_stored(1, acc + 16, ld);
  _tile_stored(2, acc + 16 * kBlk, ld);
  _tile_stored(3, acc + 16 * kBlk + 16, ld);
}

// B read in place instead of from a packed panel (a row-major B under a single row panel of A:
// packing all of a large B for a few rows of C moved it three times, e.g. Linear's dx = dy . W at
// batch 8): rows k, k + 1 of the block's 32 columns are interleaved into pairs in registers.
struct BDirect {
  const uint16_t* b;  // B row k0 (the chunk's first), column j0 (the block's first)
  int64_t ldb;        // B's row stride
  int64_t krows;      // rows of B from k0 (past them: zeros)
  __mmask32 cols;     // the block's columns inside B
};

// Rows in groups of 8: 8 x 32 accumulators, one broadcast pair of A per row and k pair. Row r's
// 32-k block kb starts at rows[r] + (runs ? runs[kb] : kb * 32) (GemmBf16::a_runs). kDirect: B
// from bd (BDirect), else the packed panel b.
template <bool kDirect>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void avx512_rows8(
    const uint16_t* const* rows, const int64_t* runs, const uint16_t* b, const BDirect* bd,
    int64_t kblocks, float* acc, bool first) {
  // pair (B[k][c], B[k+1][c]) of column c (lo: c < 16, hi: c >= 16) from rows k (0-31), k+1 (32-63)
  alignas(64) static const uint16_t lo_idx[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                  37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                  11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                                  53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                                  27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  __m512 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51, c60, c61, c70, c71;
  if (first) {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = _mm512_setzero_ps();
    c40 = c41 = c50 = c51 = c60 = c61 = c70 = c71 = _mm512_setzero_ps();
  } else {
#define NNK_LOAD_ROW(r) \
  c##r##0 = _mm512_loadu_ps(acc + r * kBlk), c##r##1 = _mm512_loadu_ps(acc + r * kBlk + 16)
    NNK_LOAD_ROW(0), NNK_LOAD_ROW(1), NNK_LOAD_ROW(2), NNK_LOAD_ROW(3);
    NNK_LOAD_ROW(4), NNK_LOAD_ROW(5), NNK_LOAD_ROW(6), NNK_LOAD_ROW(7);
#undef NNK_LOAD_ROW
  }
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const uint16_t* bk = b + kb * kPanelK;
    const int64_t off = runs ? runs[kb] : kb * kBlk;
    const uint16_t* ak[8];  // row r's pair p: the 32-bit word at ak[r] + 2p
    for (int r = 0; r < 8; ++r) ak[r] = rows[r] + off;
    for (int p = 0; p < 16; ++p) {
      __m512bh b0, b1;
      if constexpr (kDirect) {
        const int64_t k = kb * kBlk + 2 * p;
        if (k >= bd->krows) break;  // A's pairs there are zeros too
        const __m512i r0 = _mm512_maskz_loadu_epi16(bd->cols, bd->b + k * bd->ldb);
        const __m512i r1 = k + 1 < bd->krows
                               ? _mm512_maskz_loadu_epi16(bd->cols, bd->b + (k + 1) * bd->ldb)
                               : _mm512_setzero_si512();
        b0 = (__m512bh)_mm512_permutex2var_epi16(r0, lo, r1);
        b1 = (__m512bh)_mm512_permutex2var_epi16(r0, hi, r1);
      } else {
        b0 = (__m512bh)_mm512_loadu_si512(bk + p * 32);
        b1 = (__m512bh)_mm512_loadu_si512(bk + kSub + p * 32);
      }
#define NNK_ROW(r)                                         \
  {                                                        \
    int32_t pair;                                          \
    std::memcpy(&pair, ak[r] + 2 * p, 4);                  \
    const __m512bh av = (__m512bh)_mm512_set1_epi32(pair); \
    c##r##0 = _mm512_dpbf16_ps(c##r##0, av, b0);           \
    c##r##1 = _mm512_dpbf16_ps(c##r##1, av, b1);           \
  }
      NNK_ROW(0) NNK_ROW(1) NNK_ROW(2) NNK_ROW(3) NNK_ROW(4) NNK_ROW(5) NNK_ROW(6) NNK_ROW(7)
#undef NNK_ROW
    }
  }
#define NNK_STORE_ROW(r) \
  _mm512_storeu_ps(acc + r * kBlk, c##r##0), _mm512_storeu_ps(acc + r * kBlk + 16, c##r##1)
  NNK_STORE_ROW(0), NNK_STORE_ROW(1), NNK_STORE_ROW(2), NNK_STORE_ROW(3);
  NNK_STORE_ROW(4), NNK_STORE_ROW(5), NNK_STORE_ROW(6), NNK_STORE_ROW(7);
#undef NNK_STORE_ROW
}

// rows: the block's 32 row starts; runs: GemmBf16::a_runs from the chunk's first block, or null;
// bd: B in place (then b is unused), or null. Row groups past `m` rows are skipped.
void avx512_block(const uint16_t* const* rows, const int64_t* runs, const uint16_t* b,
                  const BDirect* bd, int64_t kblocks, float* acc, bool first, int64_t m) {
  for (int g8 = 0; g8 < 4 && 8 * g8 < m; ++g8) {
    if (bd)
      avx512_rows8<true>(rows + 8 * g8, runs, b, bd, kblocks, acc + 8 * g8 * kBlk, first);
    else
      avx512_rows8<false>(rows + 8 * g8, runs, b, bd, kblocks, acc + 8 * g8 * kBlk, first);
  }
}

// B rows k, k + 1 (csb == 1) -> one row of pairs for 16 columns: dst[2c + e] = B[k + e][c].
__attribute__((target("avx512f,avx512bw,avx512vl"))) void pair_rows16(const uint16_t* r0,
                                                                      const uint16_t* r1, int64_t n,
                                                                      uint16_t* dst) {
  const __mmask16 k = n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
  const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, r0));
  const __m512i hi =
      r1 ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, r1)) : _mm512_setzero_si512();
  _mm512_storeu_si512(dst, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
}
#endif

// ------------------------------------------------------------------------- B packing (fast)
// B columns [j0, j0 + 32) -> one panel (pack_b_panel's layout) for a row-major B, two rows at
// a time into 16-column pair rows.
void pack_b_panel_rows(const GemmBf16& g, int64_t j0, int64_t kblocks, uint16_t* dst) {
#if defined(NNK_X86)
  const int64_t cols = min64(kBlk, g.N - j0);
  for (int64_t kb = 0; kb < kblocks; ++kb)
    for (int64_t p = 0; p < 16; ++p) {
      const int64_t k = kb * kBlk + 2 * p;
      for (int h = 0; h < 2; ++h) {
        uint16_t* d = dst + kb * kPanelK + h * kSub + p * 32;
        const int64_t n = cols - 16 * h;
        if (k >= g.K || n <= 0) {
          std::memset(d, 0, 64);
          continue;
        }
        const bool two = k + 1 < g.K;
        if (g.b_rows) {
          const int64_t run = g.b_runs[j0 / kBlk] + 16 * h;
          pair_rows16(g.B + g.b_rows[k] + run, two ? g.B + g.b_rows[k + 1] + run : nullptr, n, d);
          continue;
        }
        const uint16_t* r0 = g.B + k * g.rsb + j0 + 16 * h;
        pair_rows16(r0, two ? r0 + g.rsb : nullptr, n, d);
      }
    }
#else
  pack_b_panel(g, j0, kblocks, dst);
#endif
}

// A K chunk: at most this many 32-k blocks, so that a B panel's chunk (16 KiB at 8) stays in L1
// while the A panels of a column pass it.
constexpr int64_t kChunkBlocks = 8;
// Column panels a thread runs side by side when B is read in place (a 4 KiB page of each B row
// at one row panel), and the most row panels of C that read B in place (each re-reads it from
// the caches; more pack it once).
constexpr int64_t kDirectPanels = 64;
constexpr int64_t kDirectMaxRowPanels = 4;
// Rows of C (in 32-row panels) one work item accumulates: at most 16 (64 KiB of float32 blocks),
// and A panels of at most half the L2 in all, so that they stay there while every column panel of
// the item re-reads them.
inline int64_t item_panels_max(int64_t panel_bytes) {
  const int64_t l2 = l2_cache_bytes();
  const int64_t fit = l2 / 2 / panel_bytes;
  return fit < 1 ? 1 : fit < 16 ? fit : 16;
}

void packed_gemm(const GemmBf16& g, Kernel kernel, int nthreads) {
  const int64_t kblocks = ceil_div(g.K, kBlk);
  const int64_t mp = ceil_div(g.M, kBlk), np = ceil_div(g.N, kBlk);
  const int64_t panel = kblocks * kPanelK;  // elements of one packed panel (A: lda = 32 kblocks)
  // A read in place: row-major with K a multiple of 32 (its last panel when M fills it), or as
  // runs (a_rows: every panel, on AVX512_BF16; AMX tiles need equally spaced rows, so packed).
  const bool a_runs = g.a_rows && kernel == Kernel::avx512;
  const bool a_in_place = !g.a_rows && g.csa == 1 && g.K % kBlk == 0;
  const int64_t full_a = a_runs ? mp : a_in_place ? g.M / kBlk : 0;  // panels read in place
  const double flops = 2.0 * double(g.M) * double(g.N) * double(g.K);
  int nt = nthreads;
  if (flops < nt * kMinFlopsPerThread) nt = flops < 2 * kMinFlopsPerThread ? 1 : 2;
  // Work items: a column panel x up to kItemPanels row panels, with their float32 blocks.
  const int64_t row_items = ceil_div(mp, item_panels_max(panel * 2)), items = np * row_items;
  const int64_t item_panels = ceil_div(mp, row_items);
  if (items < nt) nt = int(items);
  // One row panel of C and a row-major B: B read in place (BDirect), not packed.
  // (Past one row panel only for a B well past the L2, which packing would stream through memory:
  // 64 x 4096 x 4096 9.5 -> 5.3 ms, torch 4.4; a 2 MiB B re-read was slower than packed.)
  const bool b_direct =
      kernel == Kernel::avx512 && !g.b_rows && g.csb == 1 && row_items == 1 &&
      (mp == 1 || (mp <= kDirectMaxRowPanels &&
                   2.0 * double(g.K) * double(g.N) > 4.0 * double(l2_cache_bytes())));
  const int64_t group = b_direct ? kDirectPanels / mp : 1;  // mp <= 4: at least 16
  const size_t acc_floats = size_t((b_direct ? group * mp : item_panels) * kBlk * kBlk);
  const size_t packed = size_t((mp - full_a + (b_direct ? 0 : np)) * panel);
  char* ws = static_cast<char*>(
      thread_scratch(Scratch::gemm_bf16, packed * 2 + size_t(nt) * acc_floats * 4 + 64));
  uint16_t* pa = reinterpret_cast<uint16_t*>(ws);
  uint16_t* pb = pa + (mp - full_a) * panel;
  float* accs = reinterpret_cast<float*>(ws + (packed * 2 + 63) / 64 * 64);
  const bool fast_b = g.b_rows || (g.csb == 1 && g.rsb != 1);
  auto a_panel = [&](int64_t ib) {  // (row 0 of panel ib, its lda)
    return ib < full_a ? std::make_pair(g.A + ib * kBlk * g.rsa, g.rsa)
                       : std::make_pair(static_cast<const uint16_t*>(pa) + (ib - full_a) * panel,
                                        kblocks * kBlk);
  };
  const int64_t mp_packed = mp - full_a, np_packed = b_direct ? 0 : np;
  // Every thread packs its share of the A panels and its share of the B panels: the two kinds
  // can cost very differently per panel (a transposed A element by element, a row-major B two
  // rows at a time), and one split of both together left a thread waiting on the other (A^T B
  // at 1024^3: 11% of the time in the OpenMP barrier).
  const int64_t pack_items = mp_packed + np_packed;
  team_run(pack_items <= 1 ? 1 : int(std::min<int64_t>(nt, pack_items)), [&](int tid, int team) {
    int64_t b0, b1;
    split_range(mp_packed, team, tid, &b0, &b1);
    for (int64_t p = b0; p < b1; ++p)
      pack_a_panel(g, (full_a + p) * kBlk, kblocks * kBlk, pa + p * panel);
    split_range(np_packed, team, tid, &b0, &b1);
    for (int64_t p = b0; p < b1; ++p) {
      if (fast_b)
        pack_b_panel_rows(g, p * kBlk, kblocks, pb + p * panel);
      else
        pack_b_panel(g, p * kBlk, kblocks, pb + p * panel);
    }
  });
  // acc (+)= A panel ib . B panel jb over k blocks [kb, kb + kn).
  auto block = [&](int64_t ib, int64_t jb, int64_t kb, int64_t kn, float* blk) {
#if defined(NNK_X86)
    const uint16_t* b = pb + jb * panel + kb * kPanelK;
    const int64_t m = min64(kBlk, g.M - ib * kBlk), n = min64(kBlk, g.N - jb * kBlk);
    const BDirect bd{g.B + kb * kBlk * g.rsb + jb * kBlk, g.rsb, g.K - kb * kBlk,
                     n >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << n) - 1)};
    const BDirect* bdp = b_direct ? &bd : nullptr;
    const uint16_t* rows[kBlk];
    if (a_runs) {
      for (int r = 0; r < kBlk; ++r) rows[r] = g.A + g.a_rows[ib * kBlk + r];
      return avx512_block(rows, g.a_runs + kb, b, bdp, kn, blk, kb == 0, m);
    }
    const auto [a, lda] = a_panel(ib);
    if (kernel == Kernel::amx) return amx_block(a + kb * kBlk, lda, b, kn, blk, kb == 0);
    for (int r = 0; r < kBlk; ++r) rows[r] = a + r * lda + kb * kBlk;
    avx512_block(rows, nullptr, b, bdp, kn, blk, kb == 0, m);
#endif
  };
  team_run(nt, [&](int tid, int team) {
    float* acc = accs + size_t(tid) * acc_floats;
    int64_t w0, w1;
    split_range(items, team, tid, &w0, &w1);
#if defined(NNK_X86)
    if (kernel == Kernel::amx) amx_begin();
#endif
    // B in place: up to kDirectPanels column panels side by side per k chunk, so that each B row
    // is read as one run across them (one panel at a time walked B's rows a page apart).
    for (int64_t w = w0; w < w1; w += group) {
      const int64_t wn = min64(group, w1 - w);
      const int64_t jb = w / row_items, ib0 = (w % row_items) * item_panels;
      const int64_t ib1 = min64(mp, ib0 + item_panels), rows = ib1 - ib0;
      for (int64_t kb = 0; kb < kblocks; kb += kChunkBlocks) {
        const int64_t kn = min64(kChunkBlocks, kblocks - kb);
        for (int64_t j = 0; j < wn; ++j)
          for (int64_t ib = ib0; ib < ib1; ++ib)
            block(ib, jb + j, kb, kn, acc + (j * rows + ib - ib0) * kBlk * kBlk);
      }
      for (int64_t j = 0; j < wn; ++j)
        for (int64_t ib = ib0; ib < ib1; ++ib)
          store_block(g, acc + (j * rows + ib - ib0) * kBlk * kBlk, ib * kBlk, (jb + j) * kBlk,
                      min64(kBlk, g.M - ib * kBlk), min64(kBlk, g.N - (jb + j) * kBlk), true);
    }
#if defined(NNK_X86)
    if (kernel == Kernel::amx) amx_end();
#endif
  });
}

// float32 copy of a bfloat16 matrix (rows x cols, strides rs, cs) in the orientation of its
// smaller stride: row-major (ld = cols) when |cs| <= |rs|, else column-major (ld = rows). Returns
// the copy's (row stride, column stride).
std::pair<int64_t, int64_t> widen(const uint16_t* src, int64_t rows, int64_t cols, int64_t rs,
                                  int64_t cs, float* dst, int nt) {
  const bool row_major = (cs < 0 ? -cs : cs) <= (rs < 0 ? -rs : rs);
  const int64_t outer = row_major ? rows : cols, inner = row_major ? cols : rows;
  const int64_t so = row_major ? rs : cs, si = row_major ? cs : rs;
  parallel_for(
      outer, 64,
      [&](int64_t o0, int64_t o1) {
        for (int64_t o = o0; o < o1; ++o)
          for (int64_t i = 0; i < inner; ++i)
            dst[o * inner + i] = bf16_to_f32(src[o * so + i * si]);
      },
      nt);
  return row_major ? std::make_pair(cols, int64_t(1)) : std::make_pair(int64_t(1), rows);
}

// The same for an operand given as runs (GemmBf16::a_rows / b_rows): row-major, ld = cols.
void widen_runs(const uint16_t* src, int64_t rows, int64_t cols, const int64_t* row_off,
                const int64_t* runs, float* dst, int nt) {
  parallel_for(
      rows, 64,
      [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t j = 0; j < cols; ++j)
            dst[r * cols + j] = bf16_to_f32(src[row_off[r] + runs[j / kBlk] + j % kBlk]);
      },
      nt);
}

// The widening kernel: the float32 GEMM on float32 copies of A and B (and of a bfloat16 C).
void widened_gemm(const GemmBf16& g, int nt) {
  const size_t na = size_t(g.M * g.K), nb = size_t(g.K * g.N);
  const size_t nc = g.c_bf16 ? size_t(g.M * g.N) : 0;
  float* ws = thread_scratch<float>(Scratch::gemm_bf16, na + nb + nc);
  Gemm<float> f;
  f.M = g.M, f.N = g.N, f.K = g.K;
  f.A = ws;
  if (g.a_rows) {
    widen_runs(g.A, g.M, g.K, g.a_rows, g.a_runs, ws, nt);
    f.rsa = g.K, f.csa = 1;
  } else {
    std::tie(f.rsa, f.csa) = widen(g.A, g.M, g.K, g.rsa, g.csa, ws, nt);
  }
  f.B = ws + na;
  if (g.b_rows) {
    widen_runs(g.B, g.K, g.N, g.b_rows, g.b_runs, ws + na, nt);
    f.rsb = g.N, f.csb = 1;
  } else {
    std::tie(f.rsb, f.csb) = widen(g.B, g.K, g.N, g.rsb, g.csb, ws + na, nt);
  }
  f.alpha = g.alpha, f.beta = g.beta;
  f.bias_n = g.bias_n;
  f.bias_m = g.bias_m;
  if (!g.c_bf16) {
    f.C = static_cast<float*>(g.C), f.rsc = g.rsc, f.csc = g.csc;
    gemm(f, nt);
    return;
  }
  float* c = ws + na + nb;  // (M, N) row-major
  const uint16_t* cb = static_cast<const uint16_t*>(g.C);
  if (g.beta != 0.0f)
    for (int64_t i = 0; i < g.M; ++i)
      for (int64_t j = 0; j < g.N; ++j) c[i * g.N + j] = bf16_to_f32(cb[i * g.rsc + j * g.csc]);
  f.C = c, f.rsc = g.N, f.csc = 1;
  gemm(f, nt);
  uint16_t* out = static_cast<uint16_t*>(g.C);
  parallel_for(
      g.M, 64,
      [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = 0; j < g.N; ++j)
            out[i * g.rsc + j * g.csc] = f32_to_bf16(c[i * g.N + j]);
      },
      nt);
}

}  // namespace

void gemm_bf16(const GemmBf16& g, int nthreads) {
  if (g.M <= 0 || g.N <= 0) return;
  const int nt = in_parallel_region() ? 1 : nthreads > 0 ? nthreads : num_threads();
  if (g.K <= 0 || g.alpha == 0.0f) {  // C = beta * C + bias
    static const float zero[kBlk * kBlk] = {};
    for (int64_t i0 = 0; i0 < g.M; i0 += kBlk)
      for (int64_t j0 = 0; j0 < g.N; j0 += kBlk)
        store_block(g, zero, i0, j0, min64(kBlk, g.M - i0), min64(kBlk, g.N - j0), false);
    return;
  }
  const Kernel k = active_kernel();
  if (k == Kernel::widen) return widened_gemm(g, nt);
  // Linear's B = W^T with fewer rows than outputs: C^T = W . X^T, W read in place (see the top).
  if (!g.a_rows && !g.b_rows && g.rsb == 1 && g.csb != 1 && g.M < g.N && g.K % kBlk == 0) {
    GemmBf16 t = g;
    t.M = g.N, t.N = g.M;
    t.A = g.B, t.rsa = g.csb, t.csa = 1;
    t.B = g.A, t.rsb = g.csa, t.csb = g.rsa;
    t.rsc = g.csc, t.csc = g.rsc;
    t.bias_m = g.bias_n, t.bias_n = g.bias_m;
    return packed_gemm(t, k, nt);
  }
  packed_gemm(g, k, nt);
}

void sum_rows_bf16(int64_t R, int64_t N, const uint16_t* x, int64_t rsx, int64_t csx, uint16_t* out,
                   int64_t so) {
  constexpr int64_t kCols = 256;  // float32 partial sums of one column chunk, on the stack
  parallel_for(
      ceil_div(N, kCols), 1,
      [&](int64_t c0, int64_t c1) {
        float acc[kCols];
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t j0 = c * kCols, n = min64(kCols, N - j0);
          for (int64_t j = 0; j < n; ++j) acc[j] = 0.0f;
          for (int64_t i = 0; i < R; ++i) {
            const uint16_t* xi = x + i * rsx + j0 * csx;
            for (int64_t j = 0; j < n; ++j) acc[j] += bf16_to_f32(xi[j * csx]);
          }
          for (int64_t j = 0; j < n; ++j) out[(j0 + j) * so] = f32_to_bf16(acc[j]);
        }
      },
      R * N < (1 << 16) ? 1 : 0);
}

const char* gemm_bf16_kernel_name() { return kernel_name(active_kernel()); }

void bf16_to_f32_n(const uint16_t* src, float* dst, int64_t n, int64_t step) {
#if defined(NNK_X86)
  if (step == 1 && active_isa() == Isa::avx512) return bf16_to_f32_avx512(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i * step]);
}

void f32_to_bf16_n(const float* src, uint16_t* dst, int64_t n, int64_t step) {
#if defined(NNK_X86)
  if (step == 1 && active_isa() == Isa::avx512) return f32_to_bf16_avx512(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i * step] = f32_to_bf16(src[i]);
}

bool set_gemm_bf16_kernel(const char* name) {
  if (!*name) {  // back to the best
    g_limit.store(int(Kernel::amx), std::memory_order_relaxed);
    return true;
  }
  for (Kernel k : {Kernel::widen, Kernel::avx512, Kernel::amx})
    if (std::strcmp(name, kernel_name(k)) == 0) {
      if (int(k) > int(best_kernel())) return false;
      g_limit.store(int(k), std::memory_order_relaxed);
      return true;
    }
  return false;
}

}  // namespace cpu
}  // namespace nnk
