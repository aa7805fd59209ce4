// The project's GEMM on the CPU (gemm.h). Two parts: the micro-kernel and packing routines, written
// once against Simd<T> and compiled once per ISA (namespace nnk::<isa>), and the driver - ISA
// dispatch, cache blocking, packing, threading and edge tiles - compiled once (NNK_BASELINE_PASS).
//
// Loop nest per thread (BLIS):
//   for jc in N step nc:                      B block kc x nc, packed once, shared by all threads
//     for pc in K step kc:
//       pack B[pc:pc+kc, jc:jc+nc]            (threads pack disjoint NR panels, then barrier)
//       for ic in this thread's rows step mc: A block mc x kc, packed per thread
//         for jr in this thread's NR panels:  B micro-panel kc x NR, from L1 or L2
//           for ir in mc step MR:             micro-kernel on one MR x NR tile of C
//       barrier                               (before the next B block overwrites this one)
// Threads form a tm x tn grid over the tiles of C: tm splits the rows (each thread packs only its
// own A rows), tn splits the NR panels of the shared B block.
// When B for all of K fits kWholeKBytes, every K block of the jc column is packed up front behind
// one barrier instead: two barriers per K block become one per call, and a thread that the OS
// delays no longer stalls the other at every block. (A dynamic schedule over row chunks was
// measured too and was slower: chunks small enough to balance re-stream B from L3.)
// When each thread owns at most kOwnBMaxRows rows (or the grid does not split M), each thread
// packs exactly the panels it reads (own_b): threads of one row share then pack the same panels
// into copies of their own, and no barrier is left (see make_plan).
//
// Skinny shapes (BLIS's "sup" idea): packing pays only when the packed panel is reused.
//   - N of at most kSkinnyPanels panels: A is read in place (tile_strided_a) instead of packed,
//     when its rows or its columns stream (in_place_a_ok).
//   - B row-major and M of at most kSmallMTiles tiles, or B within L2 and kInPlaceMaxB at any M:
//     B rows are read in place, no packing and no barriers (in K blocks of kStreamKc rows when B
//     is larger than kInPlaceMaxB).
//   - M at most kSwapMaxRows and B = W^T (a row-major weight, as in Linear): C^T = W . A^T is
//     computed instead, so the large weight is streamed in place once and only the small A^T is
//     packed.
// A partial B panel read in place is packed into a small per-thread buffer; a short edge of rows
// runs the kernel's edge-row instance (no padded rows computed, stored straight to C).
#include "cpu/gemm.h"

#include "common/simd.h"

// ======================================================= micro-kernels (compiled once per ISA)
//
// Tile: MR rows x NR = NV*W columns of C held in MR*NV vector registers. Per k step the kernel
// loads NV vectors of the packed B row and, for each of the MR rows, broadcasts one packed A value
// and issues NV FMAs: MR*NV FMAs for NV loads + MR broadcasts.
//   AVX-512 f32 14x32: 28 accumulators + 2 B vectors (of 32 zmm).  AVX2 f32 6x16: 12 + 2 (of 16
//   ymm).
namespace nnk {
namespace NNK_ISA_NS {

template <class T, int MR, int NV>
struct GemmTile {
  using S = Simd<T>;
  using V = typename S::V;
  static constexpr int W = S::W;
  static constexpr int NR = NV * W;
  static_assert(MR * NR <= cpu::kMaxTileElems, "tile larger than the driver's edge buffer");
  static constexpr int kPrefetchA = 8;

  // One MR x NR tile of C over kc steps of k:
  //   C[i*rsc + j] = alpha * sum_k A(i, k) * b[k*rsb + j] + beta * C[i*rsc + j] (+ biases)
  // kPackedA: A(i, k) = a[k*MR + i] (a packed panel); otherwise A(i, k) = a[i*rsa + k*csa], read
  // in place (the driver's skinny paths). B rows are NR contiguous values, rsb apart: a packed
  // panel (rsb = NR) or B itself when it is row-major. beta == 0: C is not read.
  // R <= MR: the rows computed and stored. An edge tile (R < MR) reads the first R rows of a
  // packed panel, which keeps its MR stride, or R rows in place, and writes only those.
  // kA: how A is read. 0: a packed panel. 1: in place, rows rsa apart (or at arow[i]), k steps
  // csa apart. 2: in place, rows as in 1, step k at acol[k] (Gemm::a_rows / a_cols).
  template <int kA, int R = MR>
  static NNK_INLINE void run(int64_t kc, const T* __restrict a, int64_t rsa, int64_t csa,
                             const int64_t* arow, const int64_t* acol, const T* __restrict b,
                             int64_t rsb, T* __restrict c, int64_t rsc, T alpha, T beta,
                             const T* bias_m, const T* bias_n) {
    constexpr bool kPackedA = kA == 0;
    V acc[R][NV];
#pragma GCC unroll 32
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = S::zero();

    // C is written after the k loop; start fetching it now.
#pragma GCC unroll 32
    for (int i = 0; i < R; ++i) {
      __builtin_prefetch(c + i * rsc, 1, 3);
      __builtin_prefetch(c + i * rsc + NR - 1, 1, 3);
    }

    const T* rows[R];  // unpacked A: one pointer per row (rsa apart or at arow)
#pragma GCC unroll 32
    for (int i = 0; i < R; ++i) rows[i] = a + (arow ? arow[i] : i * rsa);

#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k) {
      // The packed A panel streams from L2: fetch it kPrefetchA steps ahead.
      if (kPackedA) __builtin_prefetch(a + kPrefetchA * MR, 0, 3);
      V bv[NV];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) bv[j] = S::load(b + j * W);
#pragma GCC unroll 32
      for (int i = 0; i < R; ++i) {
        const V av = S::set1(kA == 0 ? a[i] : kA == 1 ? *rows[i] : rows[i][acol[k]]);
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) acc[i][j] = S::fma(av, bv[j], acc[i][j]);
      }
      if (kA == 0) {
        a += MR;
      } else if (kA == 1) {
#pragma GCC unroll 32
        for (int i = 0; i < R; ++i) rows[i] += csa;
      }
      b += rsb;
    }

    const V va = S::set1(alpha), vb = S::set1(beta);
#pragma GCC unroll 32
    for (int i = 0; i < R; ++i) {
      T* ci = c + i * rsc;
      const V rowb = bias_m ? S::set1(bias_m[i]) : S::zero();
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) {
        V r = S::mul(acc[i][j], va);
        if (beta != T(0)) r = S::fma(vb, S::load(ci + j * W), r);
        if (bias_n) r = S::add(r, S::load(bias_n + j * W));
        if (bias_m) r = S::add(r, rowb);
        S::store(ci + j * W, r);
      }
    }
  }

  template <int R = MR>
  static void tile(int64_t kc, const T* a, const T* b, int64_t rsb, T* c, int64_t rsc, T alpha,
                   T beta, const T* bias_m, const T* bias_n) {
    run<0, R>(kc, a, 0, 0, nullptr, nullptr, b, rsb, c, rsc, alpha, beta, bias_m, bias_n);
  }

  template <int R = MR>
  static void tile_strided_a(int64_t kc, const T* a, int64_t rsa, int64_t csa, const int64_t* arow,
                             const int64_t* acol, const T* b, int64_t rsb, T* c, int64_t rsc,
                             T alpha, T beta, const T* bias_m, const T* bias_n) {
    if (acol)
      run<2, R>(kc, a, rsa, csa, arow, acol, b, rsb, c, rsc, alpha, beta, bias_m, bias_n);
    else
      run<1, R>(kc, a, rsa, csa, arow, nullptr, b, rsb, c, rsc, alpha, beta, bias_m, bias_n);
  }

  // Peak probe: MR*NV independent FMA chains, the register budget of the kernel and nothing else
  // (no loads). Returns the flops executed; the sum lands in sink[0..W) so nothing is elided.
  static int64_t fma_loop(int64_t iters, T* sink) {
    V acc[MR][NV];
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = S::set1(T(i * NV + j));
    const V m = S::set1(T(0.999999)), c = S::set1(T(1e-6));
    for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) acc[i][j] = S::fma(acc[i][j], m, c);
    V s = S::zero();
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) s = S::add(s, acc[i][j]);
    S::store(sink, s);
    return iters * MR * NV * W * 2;
  }

  // dot_rows (gemm.h) for NX columns: four rows at a time, W lanes of k per step, so A streams
  // through once in long runs. Each dot is W partial sums then their total.
  template <int NX>
  static void dot_rows_n(int64_t m, int64_t k, const T* a, int64_t rsa, const T* b, int64_t csb,
                         T* c, int64_t rsc, int64_t csc, T alpha, T beta, const T* bias_m,
                         const T* bias_n) {
    constexpr int RB = 4;
    for (int64_t i0 = 0; i0 < m; i0 += RB) {
      const int rows = m - i0 < RB ? int(m - i0) : RB;
      V acc[RB][NX];
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < NX; ++j) acc[r][j] = S::zero();
      const T* ar[RB];
      for (int r = 0; r < RB; ++r) ar[r] = a + (i0 + (r < rows ? r : 0)) * rsa;
      int64_t p = 0;
      for (; p + W <= k; p += W) {
        V bv[NX];
#pragma GCC unroll 4
        for (int j = 0; j < NX; ++j) bv[j] = S::load(b + j * csb + p);
#pragma GCC unroll 4
        for (int r = 0; r < RB; ++r) {
          const V av = S::load(ar[r] + p);
#pragma GCC unroll 4
          for (int j = 0; j < NX; ++j) acc[r][j] = S::fma(av, bv[j], acc[r][j]);
        }
      }
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < NX; ++j) {
          alignas(64) T lanes[W];
          S::store(lanes, acc[r][j]);
          T sum = T(0);
          for (int l = 0; l < W; ++l) sum += lanes[l];
          for (int64_t q = p; q < k; ++q) sum += ar[r][q] * b[j * csb + q];
          T& out = c[(i0 + r) * rsc + j * csc];
          T v = alpha * sum;
          if (beta != T(0)) v += beta * out;
          if (bias_n) v += bias_n[j];
          if (bias_m) v += bias_m[i0 + r];
          out = v;
        }
    }
  }

  static void dot_rows(int64_t m, int64_t k, int64_t n, const T* a, int64_t rsa, const T* b,
                       int64_t csb, T* c, int64_t rsc, int64_t csc, T alpha, T beta,
                       const T* bias_m, const T* bias_n) {
    static_assert(cpu::kDotCols == 4, "one instance per column count");
    switch (n) {
      case 1:
        return dot_rows_n<1>(m, k, a, rsa, b, csb, c, rsc, csc, alpha, beta, bias_m, bias_n);
      case 2:
        return dot_rows_n<2>(m, k, a, rsa, b, csb, c, rsc, csc, alpha, beta, bias_m, bias_n);
      case 3:
        return dot_rows_n<3>(m, k, a, rsa, b, csb, c, rsc, csc, alpha, beta, bias_m, bias_n);
      default:
        return dot_rows_n<4>(m, k, a, rsa, b, csb, c, rsc, csc, alpha, beta, bias_m, bias_n);
    }
  }

#if defined(NNK_HAVE_BLOCK_TRANSPOSE)
  // One TB-wide k step of an A panel whose rows are contiguous in k: the MR rows in groups of TB
  // (the last group may be short), each transposed into dst[kk*MR + g + i].
  template <int G>
  static NNK_INLINE void transpose_row_groups(const T* src, int64_t rsa, T* dst) {
    using BT = BlockTranspose<T>;
    constexpr int ROWS = MR - G < BT::TB ? MR - G : BT::TB;
    BT::template run<ROWS>(src + G * rsa, rsa, dst + G, MR);
    if constexpr (G + BT::TB < MR) transpose_row_groups<G + BT::TB>(src, rsa, dst);
  }
#endif

  static void pack_a(int64_t m, int64_t k, const T* a, int64_t rsa, int64_t csa, T* dst) {
    for (int64_t i0 = 0; i0 < m; i0 += MR, dst += MR * k) {
      const int64_t mr = m - i0 < MR ? m - i0 : MR;
      const T* src = a + i0 * rsa;
      if (mr == MR && csa == 1) {
        // Rows contiguous in k (A row-major): a transpose. TB x TB blocks in registers where the
        // ISA has them (row groups of TB, the last one masked), scalar for the k tail.
        int64_t p = 0;
#if defined(NNK_HAVE_BLOCK_TRANSPOSE)
        for (; p + BlockTranspose<T>::TB <= k; p += BlockTranspose<T>::TB)
          transpose_row_groups<0>(src + p, rsa, dst + p * MR);
#endif
        for (; p < k; ++p)
#pragma GCC unroll 32
          for (int i = 0; i < MR; ++i) dst[p * MR + i] = src[i * rsa + p];
      } else if (mr == MR && rsa == 1) {
        // Columns contiguous (A transposed): each k step is one contiguous run of MR.
        for (int64_t p = 0; p < k; ++p)
#pragma GCC unroll 32
          for (int i = 0; i < MR; ++i) dst[p * MR + i] = src[p * csa + i];
      } else {
        // An edge panel (or odd strides): its mr rows, the rest zero.
        if (mr < MR) zero(dst, k * MR);
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t p = 0; p < k; ++p) dst[p * MR + i] = src[i * rsa + p * csa];
      }
    }
  }

  // dst[0 .. n) = 0 (n need not be a multiple of W).
  static NNK_INLINE void zero(T* dst, int64_t n) {
    int64_t i = 0;
    for (; i + W <= n; i += W) S::store(dst + i, S::zero());
    for (; i < n; ++i) dst[i] = T(0);
  }

#if defined(NNK_HAVE_BLOCK_TRANSPOSE)
  // BlockTranspose<T>::run<rows> for a runtime rows < TB.
  template <int R = 1>
  static NNK_INLINE void transpose_rows(int rows, const T* src, int64_t lds, T* dst, int64_t ldd) {
    if constexpr (R < BlockTranspose<T>::TB) {
      if (rows == R) return BlockTranspose<T>::template run<R>(src, lds, dst, ldd);
      transpose_rows<R + 1>(rows, src, lds, dst, ldd);
    }
  }
#endif

  // One B panel whose columns are contiguous in k (B = W^T of a row-major weight): column j < nr
  // is the run src[j*csb + p], p < k; columns past nr are zero: a transpose.
  static void pack_b_columns(int64_t k, int64_t nr, const T* src, int64_t csb, T* dst) {
    if (nr < NR) zero(dst, k * NR);
    transpose(nr, k, src, csb, dst, NR);
  }

  // dst[j*ldd + i] = src[i*lds + j] for i < m, j < n: TB x TB register blocks where the ISA has
  // them (a short group of rows as a short block), else blocks of 8 columns so each source row
  // is read in runs; scalar for the tail.
  static void transpose(int64_t m, int64_t n, const T* src, int64_t lds, T* dst, int64_t ldd) {
    int64_t j = 0;
#if defined(NNK_HAVE_BLOCK_TRANSPOSE)
    using BT = BlockTranspose<T>;
    for (; j + BT::TB <= n; j += BT::TB) {
      int64_t i = 0;
      for (; i + BT::TB <= m; i += BT::TB)
        BT::template run<BT::TB>(src + i * lds + j, lds, dst + j * ldd + i, ldd);
      if (i < m) transpose_rows(int(m - i), src + i * lds + j, lds, dst + j * ldd + i, ldd);
    }
#else
    for (; j + 8 <= n; j += 8)
      for (int64_t i = 0; i < m; ++i) {
        const T* row = src + i * lds + j;
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) dst[(j + q) * ldd + i] = row[q];
      }
#endif
    for (; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) dst[j * ldd + i] = src[i * lds + j];
  }

  static void pack_b(int64_t k, int64_t n, const T* b, int64_t rsb, int64_t csb, T* dst) {
    for (int64_t j0 = 0; j0 < n; j0 += NR, dst += NR * k) {
      const int64_t nr = n - j0 < NR ? n - j0 : NR;
      const T* src = b + j0 * csb;
      if (nr == NR && csb == 1) {
        // Rows contiguous (B row-major): a vector copy per k step.
        for (int64_t p = 0; p < k; ++p)
#pragma GCC unroll 8
          for (int j = 0; j < NV; ++j)
            S::store(dst + p * NR + j * W, S::load(src + p * rsb + j * W));
      } else if (rsb == 1) {
        pack_b_columns(k, nr, src, csb, dst);
      } else {
        if (nr < NR) zero(dst, k * NR);
        for (int64_t p = 0; p < k; ++p)
          for (int64_t j = 0; j < nr; ++j) dst[p * NR + j] = src[p * rsb + j * csb];
      }
    }
  }
};

// Entries [R, MR) of the edge-row tables, one instance per row count.
template <class T, int MR, int NV, int R = 1>
constexpr void fill_edge_tiles(cpu::GemmUKernel<T>& k) {
  if constexpr (R < MR) {
    using K = GemmTile<T, MR, NV>;
    k.tile_rows[R] = &K::template tile<R>;
    k.tile_strided_a_rows[R] = &K::template tile_strided_a<R>;
    fill_edge_tiles<T, MR, NV, R + 1>(k);
  }
}

template <class T, int MR, int NV>
constexpr cpu::GemmUKernel<T> make_gemm_ukernel(const char* name, int mc, int kc, int nc) {
  static_assert(MR <= cpu::kMaxMR, "edge-row tables too short");
  using K = GemmTile<T, MR, NV>;
  cpu::GemmUKernel<T> k{name,
                        MR,
                        K::NR,
                        mc,
                        kc,
                        nc,
                        &K::template tile<MR>,
                        &K::template tile_strided_a<MR>,
                        &K::pack_a,
                        &K::pack_b,
                        &K::fma_loop,
                        &K::dot_rows,
                        &K::transpose,
                        {},
                        {}};
  fill_edge_tiles<T, MR, NV>(k);
  return k;
}

// The kernels of this pass. AVX-512 (Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4): 32 zmm
// registers, 2 x 512-bit FMA; f32 14x32 and f64 14x16 are 28 accumulators + 2 B vectors. AVX2 +
// FMA (Haswell and later, Zen): 16 ymm, f32 6x16 and f64 6x8 are 12 accumulators + 2 B vectors +
// 1 broadcast. Both take K blocks of up to 1024 float / 512 double rows (their tables' kc):
// each K block loads and stores every C tile once more, and the B micro-panel (kc x NR, 128 KiB
// here) need not stay in L1 - per k step the kernel reads 2 B vectors over 28 FMA cycles (AVX2: 2
// over 6), a few bytes per cycle that L2 and its prefetchers deliver. Measured on the 2-vCPU
// Zen 4 (32 KiB L1, 1 MiB L2), 2 threads, against kc = 192 / 384 (B micro-panel in L1): AVX-512
// 2048^3 73 -> 87% of the FMA peak, 512 x 4608 x 98 (ResNet's 3x3 512 -> 512 at 7x7 as a GEMM)
// 0.80 -> 1.07x torch, 128 x 576 x 1568 1.13 -> 1.26x; AVX2 1024^3 71 -> 77%, 2048^3 77 -> 80%,
// 512 x 4608 x 98 0.92 -> 1.02x; no shape slower beyond 0.01x. mc (the A block, packed per thread)
// is the kernel's, or less so that mc x kc fills at most 2/3 of L2 (plan_mc). Baseline (16-byte
// vectors, 16 registers): f32 6x8 and f64 6x4, 12 accumulators + 2 B vectors.
//
// Each pass also has a narrow kernel, one vector wide (NV = 1), for products with N of at most one
// vector (a Linear layer with few outputs, the transposed problems of small batches): at N = 8 the
// wide AVX-512 tile computes 32 columns for 8, the narrow one 16.
template <class T, bool kNarrow>
const cpu::GemmUKernel<T>& gemm_ukernel_of() {
  constexpr bool f32 = sizeof(T) == 4;
  constexpr int NV = kNarrow ? 1 : 2;
#if NNK_ISA_LEVEL == 2
  static constexpr cpu::GemmUKernel<T> k = make_gemm_ukernel<T, cpu::Avx512Tiles::mr, NV>(
      kNarrow ? (f32 ? "sgemm_avx512_14x16" : "dgemm_avx512_14x8")
              : (f32 ? "sgemm_avx512_14x32" : "dgemm_avx512_14x16"),
      f32 ? cpu::Avx512Tiles::s_mc : cpu::Avx512Tiles::d_mc,
      f32 ? cpu::Avx512Tiles::s_kc : cpu::Avx512Tiles::d_kc,
      f32 ? cpu::Avx512Tiles::s_nc : cpu::Avx512Tiles::d_nc);
#elif NNK_ISA_LEVEL == 1
  static constexpr cpu::GemmUKernel<T> k =
      make_gemm_ukernel<T, 6, NV>(kNarrow ? (f32 ? "sgemm_avx2_6x8" : "dgemm_avx2_6x4")
                                          : (f32 ? "sgemm_avx2_6x16" : "dgemm_avx2_6x8"),
                                  f32 ? 144 : 72, f32 ? 1024 : 512, f32 ? 4080 : 2040);
#else
  static constexpr cpu::GemmUKernel<T> k =
      make_gemm_ukernel<T, 6, NV>(kNarrow ? (f32 ? "sgemm_baseline_6x4" : "dgemm_baseline_6x2")
                                          : (f32 ? "sgemm_baseline_6x8" : "dgemm_baseline_6x4"),
                                  120, 256, 2048);
#endif
  return k;
}

template <class T>
const cpu::GemmUKernel<T>& gemm_ukernel() {
  return gemm_ukernel_of<T, false>();
}
template <class T>
const cpu::GemmUKernel<T>& gemm_ukernel_narrow() {
  return gemm_ukernel_of<T, true>();
}
template const cpu::GemmUKernel<float>& gemm_ukernel<float>();
template const cpu::GemmUKernel<double>& gemm_ukernel<double>();
template const cpu::GemmUKernel<float>& gemm_ukernel_narrow<float>();
template const cpu::GemmUKernel<double>& gemm_ukernel_narrow<double>();

#if NNK_ISA_LEVEL == 1
// The AVX-512 geometry on AVX2 registers (56 / 28 accumulators: it spills, it is for tests only).
template <class T>
const cpu::GemmUKernel<T>& gemm_ukernel_avx512_tiles() {
  constexpr bool f32 = sizeof(T) == 4;
  static constexpr cpu::GemmUKernel<T> k =
      make_gemm_ukernel<T, cpu::Avx512Tiles::mr,
                        (f32 ? cpu::Avx512Tiles::s_nr : cpu::Avx512Tiles::d_nr) / (32 / sizeof(T))>(
          f32 ? "sgemm_avx2_14x32_test" : "dgemm_avx2_14x16_test",
          f32 ? cpu::Avx512Tiles::s_mc : cpu::Avx512Tiles::d_mc,
          f32 ? cpu::Avx512Tiles::s_kc : cpu::Avx512Tiles::d_kc,
          f32 ? cpu::Avx512Tiles::s_nc : cpu::Avx512Tiles::d_nc);
  return k;
}
template const cpu::GemmUKernel<float>& gemm_ukernel_avx512_tiles<float>();
template const cpu::GemmUKernel<double>& gemm_ukernel_avx512_tiles<double>();
#endif

}  // namespace NNK_ISA_NS
}  // namespace nnk

// ======================================================================== driver (compiled once)
#if NNK_BASELINE_PASS
#include <atomic>
#include <cstdlib>
#include <new>

#include "common/isa.h"
#include "common/threading.h"
#include "common/workspace.h"

namespace nnk {
NNK_PER_ISA(template <class T> const cpu::GemmUKernel<T>& gemm_ukernel())
NNK_PER_ISA(template <class T> const cpu::GemmUKernel<T>& gemm_ukernel_narrow())
#if defined(NNK_X86)
namespace avx2 {
template <class T>
const cpu::GemmUKernel<T>& gemm_ukernel_avx512_tiles();
}
#endif
}  // namespace nnk

namespace nnk {
namespace cpu {

static std::atomic<bool> g_avx512_tiles{false};
void set_emulated_avx512_tiles(bool on) { g_avx512_tiles.store(on, std::memory_order_relaxed); }
bool emulated_avx512_tiles() { return g_avx512_tiles.load(std::memory_order_relaxed); }

template <class T>
const GemmUKernel<T>& active_gemm_ukernel() {
#if defined(NNK_X86)
  if (active_isa() == Isa::avx2 && emulated_avx512_tiles())
    return avx2::gemm_ukernel_avx512_tiles<T>();
#endif
  return NNK_ISA_CALL(gemm_ukernel<T>());
}

// The kernel of a product with N columns: the narrow one when N fits its single vector (except at
// the emulated AVX-512 geometry, which tests the wide kernel's paths). A function of N only, so
// that gemm_pack_b and the product agree on the packed layout.
template <class T>
const GemmUKernel<T>& gemm_ukernel_for(int64_t N) {
#if defined(NNK_X86)
  if (active_isa() == Isa::avx2 && emulated_avx512_tiles())
    return avx2::gemm_ukernel_avx512_tiles<T>();
#endif
  const GemmUKernel<T>& narrow = NNK_ISA_CALL(gemm_ukernel_narrow<T>());
  return N <= narrow.nr ? narrow : NNK_ISA_CALL(gemm_ukernel<T>());
}

namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Below this many flops per thread the fork/join costs more than the thread saves.
constexpr double kMinFlopsPerThread = 1 << 18;
// Pack B for all of K at once when it is at most this large (it stays in L3).
constexpr int64_t kWholeKBytes = 4 << 20;
// Skinny thresholds (see the header comment).
constexpr int64_t kSkinnyPanels = 4;
constexpr int64_t kSmallMTiles = 2;
// C^T = B^T A^T for at most this many rows (see oriented). At 9-128 rows the transposed problem's
// strided C stores and in-place A cost more than packing W^T: Linear(784, 300) at batch 16 / 64 /
// 128 ran 0.54 / 0.61 / 0.63x torch swapped, 0.57 / 0.82 / 0.85x not.
constexpr int64_t kSwapMaxRows = 8;
constexpr int64_t kInPlaceMaxB = 1 << 18;      // elements
constexpr int64_t kOwnBMaxRows = 512;          // rows per thread up to which B is packed per thread
constexpr int64_t kStreamKc = 32;              // K block of a larger B read in place
constexpr int64_t kInPlaceMaxRowBytes = 4096;  // B rows a small B read in place may be apart
// dot_rows below this K: the tile path's overheads are no longer the cost (and tests keep its
// narrow-N edge paths).
constexpr int64_t kDotMinK = 64;

// K and N blocks: no larger than the kernel's, and balanced (K = 1200 runs as 600 + 600, not
// 1024 + 176). They depend on K, N and the kernel only, so a B packed ahead (gemm_pack_b) matches
// every plan's.
struct Blocks {
  int64_t kc, nc;
};

// Rows of an A block (mc x kc, packed per thread, re-read from L2 for every B micro-panel): the
// kernel's mc, or fewer so that it fills at most 2/3 of L2 beside the streaming B micro-panel (the
// AVX-512 float kernel at kc = 1024 on a 1 MiB L2: 168 rows, 672 KiB).
template <class T>
int64_t plan_mc(const GemmUKernel<T>& uk, int64_t kc) {
  const int64_t fit = 2 * l2_cache_bytes() / 3 / (kc * int64_t(sizeof(T))) / uk.mr * uk.mr;
  return fit < uk.mr ? uk.mr : fit < uk.mc ? fit : uk.mc;
}

template <class T>
Blocks kn_blocks(int64_t K, int64_t N, const GemmUKernel<T>& uk) {
  const int64_t kb = ceil_div(K, uk.kc), nb = ceil_div(N, uk.nc);
  return {ceil_div(K, kb), round_up(ceil_div(N, nb), uk.nr)};
}

struct Plan {
  int nt = 1, tm = 1, tn = 1;  // threads, as a tm x tn grid over the tiles of C
  int64_t mc = 0, kc = 0, nc = 0;
  bool pack_a = true;     // false: A read in place (skinny N)
  bool pack_b = true;     // false: B rows read in place (small M, row-major B)
  bool whole_k = false;   // B packed for all of K per jc block (see the header comment)
  bool own_b = false;     // each thread packs the B panels it reads, no barriers (see make_plan)
  size_t bsize = 0;       // elements of the packed B buffer (own_b: of each thread's own)
  size_t per_thread = 0;  // elements: the A block (if packed) + one edge B panel
  size_t workspace = 0;   // elements: the packed B buffer + per_thread for each thread
};

// A read in place by the skinny path: row-major (each row streams along k), or column-major with
// k steps at most kInPlaceStrideBytes apart. A tile then reads its MR values of one k step from
// one or two cache lines and the next k step's a stride further on, which the hardware
// prefetchers follow only up to about 2 KiB; past that every k step waits on memory. ResNet's
// 512 -> 512 data gradient at 7x7 (dcol = W^T . dY, k steps 18 KiB apart, N = 98) ran 0.60x
// torch in place and 0.80x packed; A^T B at 512 x 4096 x 64 (k steps 2 KiB apart) 1.0x in place,
// 0.70x packed.
constexpr int64_t kInPlaceStrideBytes = 2048;
template <class T>
bool in_place_a_ok(const Gemm<T>& g) {
  const int64_t stride = (g.csa < 0 ? -g.csa : g.csa) * int64_t(sizeof(T));
  return g.csa == 1 || (g.rsa == 1 && stride <= kInPlaceStrideBytes);
}

// The narrow kernel when it is uk at half the width (same MR): it then runs a last panel of at
// most NR/2 columns at half the cost (Worker::half).
template <class T>
const GemmUKernel<T>* half_kernel(const GemmUKernel<T>& uk) {
  const GemmUKernel<T>& narrow = NNK_ISA_CALL(gemm_ukernel_narrow<T>());
  return &narrow != &uk && narrow.mr == uk.mr && 2 * narrow.nr == uk.nr ? &narrow : nullptr;
}

// The cost of `rows` rows of C in MR-row tiles, in rows: a short last tile costs at least half a
// full one (it still streams the whole B micro-panel for few FMAs per load). Splitting M = 30 x N
// = 784 evenly (15 rows each: a 14-row and a 1-row tile per panel) ran 0.90-0.97x the 1 x 2 grid.
inline int64_t tile_rows_cost(int64_t rows, int64_t mr) {
  const int64_t rest = rows % mr;
  return rows - rest + (rest == 0 ? 0 : rest > mr / 2 ? rest : mr / 2);
}

template <class T>
Plan make_plan(const Gemm<T>& g, const GemmUKernel<T>& uk, int max_threads) {
  Plan p;
  const int64_t mtiles = ceil_div(g.M, uk.mr), ntiles = ceil_div(g.N, uk.nr);
  const double flops = 2.0 * double(g.M) * double(g.N) * double(g.K);
  int64_t nt = max_threads;
  if (flops / kMinFlopsPerThread < nt)
    nt = flops < kMinFlopsPerThread ? 1 : int64_t(flops / kMinFlopsPerThread);
  if (mtiles * ntiles < nt) nt = mtiles * ntiles;
  p.nt = nt < 1 ? 1 : int(nt);

  // Grid: minimise the most work any thread owns: the cost of its rows (tile_rows_cost) times its
  // half panels (a last panel that the half kernel runs counts one, others two); on ties split M
  // (no A re-packing). Rows are split evenly, not by whole tiles (run_thread). Linear(300, 100) at
  // batch 256 (19 x 3.5 panels of tiles): a 2 x 1 grid gives each thread 10 x 3.5, a 1 x 2 grid
  // one of them 19 x 2 - 1.07x faster (interleaved A/B, 2 threads, Zen 4).
  const int64_t rest = g.N % uk.nr;
  const GemmUKernel<T>* half = half_kernel(uk);
  const bool half_edge = half && rest && rest <= half->nr;
  int64_t best = -1;
  for (int tm = p.nt; tm >= 1; --tm) {
    if (p.nt % tm) continue;
    const int tn = p.nt / tm;
    int64_t most = 0;  // half panels of the busiest column share
    for (int jt = 0; jt < tn; ++jt) {
      int64_t q0, q1;
      split_range(ntiles, tn, jt, &q0, &q1);
      const int64_t units = 2 * (q1 - q0) - (half_edge && q1 == ntiles && q1 > q0 ? 1 : 0);
      most = units > most ? units : most;
    }
    const int64_t cost = tile_rows_cost(ceil_div(g.M, tm), uk.mr) * most;
    if (best < 0 || cost < best) {
      best = cost;
      p.tm = tm;
      p.tn = tn;
    }
  }

  const Blocks b = kn_blocks(g.K, g.N, uk);
  p.kc = b.kc;
  p.nc = b.nc;
  const int64_t kb = ceil_div(g.K, p.kc);
  const int64_t rows = ceil_div(g.M, p.tm);  // rows per thread
  const int64_t mb = ceil_div(rows, plan_mc(uk, p.kc));
  p.mc = round_up(ceil_div(rows, mb), uk.mr);
  p.pack_a = !g.a_rows && !g.a_cols && !(ntiles <= kSkinnyPanels && in_place_a_ok(g));
  // Few rows and B row-major: B is read in place, never packed (each B element serves at most
  // 2 tiles). A tile reads kc rows of B rsb apart, as many concurrent streams; through a large
  // B the prefetchers follow only a few, so there K blocks are kStreamKc rows (C, M x N, is
  // reloaded once per block from cache instead). Measured torch/ours on the 2-vCPU Xeon, 2
  // threads, B packed -> in place with kc 32 (three interleaved A/B runs): 8 x 4096 x 4096 0.80
  // -> 0.96, 8 x 1024 x 1024 0.67 -> 0.84, 16 x 1024 x 4096 0.47 -> 0.74, 20 x 200 x 4000 0.44
  // -> 0.59; VGG's dX = dY . W at 8 x 4096 x 25088 unchanged within the noise (0.79 / 0.75);
  // kc 16 and 64 were slower.
  // B that fits L2 with rows at most a page apart is read in place at any M too: it stays in L2
  // after the first tile row, and skipping the pack skips the barrier behind it, which at 2
  // threads on a small product cost more than the pack (torch/ours, 2 threads, Zen 4, interleaved
  // runs, packed -> in place, M x K x N: 128^3 0.67-0.75 -> 1.02-1.07, 256 x 100 x 300 0.94 ->
  // 1.08-1.13, 64 x 784 x 300 1.11-1.18 -> 1.28-1.64, Linear's dX = dY . W at 256 x 300 x 784
  // 1.03-1.08 -> 1.11-1.45; 1 thread 1.0-1.05x better). Not past kInPlaceMaxB, where K blocks
  // would shrink to kStreamKc: on a 2 MiB L2 (the Xeon with AMX) 512 x 4608 x 98 (1.8 MB of B)
  // ran in place at 0.67x torch, packed at 0.97x.
  const bool small_b = g.K * g.N <= kInPlaceMaxB &&
                       g.K * g.N * int64_t(sizeof(T)) <= l2_cache_bytes() &&
                       g.rsb * int64_t(sizeof(T)) <= kInPlaceMaxRowBytes;
  if ((mtiles <= kSmallMTiles || small_b) && g.csb == 1 && !g.packed_b && !g.pack_b_fn) {
    p.pack_b = false;
    if (g.K * g.N > kInPlaceMaxB) p.kc = min64(p.kc, kStreamKc);
  }
  p.whole_k = p.pack_b && !g.packed_b && kb > 1 && g.K * p.nc * int64_t(sizeof(T)) <= kWholeKBytes;
  p.bsize = p.pack_b && !g.packed_b ? size_t((p.whole_k ? g.K : p.kc) * p.nc) : 0;
  // Packed B shared by a tm > 1 grid is read by every thread from the cores that packed it: for
  // few rows per thread that cross-core traffic and the barriers cost more than each row share
  // packing its own copy (a tm = 1 grid packs disjoint panels either way, so it only drops the
  // barriers). Measured torch/ours on the 2-vCPU Sapphire Rapids-class Xeon, 2 threads, shared ->
  // own B (interleaved runs, M x K x N with B = W^T): 64 x 300 x 100 0.43 -> 0.92-0.99, 128 x 300
  // x 96 0.54 -> 0.86-0.89, 512 x 300 x 96 0.79 -> 0.95-0.97, 1024 x 300 x 96 0.92 -> 1.00;
  // Linear(300, 100) at batch 256 0.86-0.92 -> 1.19-1.25, (784, 300) 1.06-1.08 -> 1.17; square
  // 512^3 to 2048^3, conv2d and LSTM suites unchanged within 0.03.
  p.own_b = p.bsize && p.nt > 1 && (p.tm == 1 || rows <= kOwnBMaxRows);
  // Own B: the busiest column share's panels, for K (whole_k) or one K block, per thread. The
  // buffers are private, so a thread never overwrites panels that another still reads (the
  // layout of a shared buffer moves with each block's kc and panel count).
  if (p.own_b)
    p.bsize = size_t((p.whole_k ? g.K : p.kc) * ceil_div(ceil_div(p.nc, uk.nr), p.tn) * uk.nr);
  p.per_thread = size_t((p.pack_a ? p.mc : 0) * p.kc + p.kc * uk.nr);
  p.workspace = p.bsize * (p.own_b ? p.nt : 1) + p.nt * p.per_thread;
  return p;
}

// C = beta * C + biases: the whole product when K == 0 or alpha == 0.
template <class T>
void scale_only(const Gemm<T>& g) {
  for (int64_t i = 0; i < g.M; ++i)
    for (int64_t j = 0; j < g.N; ++j) {
      T& c = g.C[i * g.rsc + j * g.csc];
      T r = g.beta == T(0) ? T(0) : g.beta * c;
      if (g.bias_m) r += g.bias_m[i];
      if (g.bias_n) r += g.bias_n[j];
      c = r;
    }
}

// C = A . B as C^T = B^T . A^T when M is at most kSwapMaxRows and B is a transposed row-major
// matrix (Linear's W^T): the large W is then read in place as the A operand, and only the small
// A^T is packed.
template <class T>
Gemm<T> oriented(const Gemm<T>& g, const GemmUKernel<T>& uk) {
  const bool swap = !g.pack_b_fn && !g.packed_b && !g.a_rows && !g.a_cols && g.csb != 1 &&
                    g.rsb == 1 && g.M <= kSwapMaxRows && g.N > g.M;
  if (!swap) return g;
  Gemm<T> t = g;
  t.M = g.N;
  t.N = g.M;
  t.A = g.B;
  t.rsa = g.csb;
  t.csa = g.rsb;
  t.B = g.A;
  t.rsb = g.csa;
  t.csb = g.rsa;
  t.rsc = g.csc;
  t.csc = g.rsc;
  t.bias_m = g.bias_n;
  t.bias_n = g.bias_m;
  return t;
}

// Writes a tile computed into `tmp` (ldt apart): edge tiles, and every tile when C is not unit-
// stride along j. Walks C along its smaller stride (a transposed C is written column by column).
// r = alpha * tmp, then + beta * c, + bias_n[j], + bias_m[i] where present (the kernel's order).
template <bool kBeta, bool kBiasN, bool kBiasM, class T>
void store_edge_rows(const T* tmp, int64_t ldt, int64_t mr, int64_t nr, T* c, int64_t rsc, T alpha,
                     T beta, const T* bias_m, const T* bias_n) {
  for (int64_t i = 0; i < mr; ++i) {
    T* ci = c + i * rsc;
    const T* ti = tmp + i * ldt;
    for (int64_t j = 0; j < nr; ++j) {  // unit stride: vectorised
      T r = alpha * ti[j];
      if constexpr (kBeta) r += beta * ci[j];
      if constexpr (kBiasN) r += bias_n[j];
      if constexpr (kBiasM) r += bias_m[i];
      ci[j] = r;
    }
  }
}

template <class T>
void store_edge(const T* tmp, int64_t ldt, int64_t mr, int64_t nr, T* c, int64_t rsc, int64_t csc,
                T alpha, T beta, const T* bias_m, const T* bias_n) {
  if (csc == 1) {
    const int flags = (beta != T(0)) * 4 + (bias_n != nullptr) * 2 + (bias_m != nullptr);
    switch (flags) {
#define NNK_STORE_CASE(f)                                                                          \
  case f:                                                                                          \
    return store_edge_rows<bool(f & 4), bool(f & 2), bool(f & 1)>(tmp, ldt, mr, nr, c, rsc, alpha, \
                                                                  beta, bias_m, bias_n);
      NNK_STORE_CASE(0)
      NNK_STORE_CASE(1)
      NNK_STORE_CASE(2)
      NNK_STORE_CASE(3)
      NNK_STORE_CASE(4)
      NNK_STORE_CASE(5)
      NNK_STORE_CASE(6)
      NNK_STORE_CASE(7)
#undef NNK_STORE_CASE
    }
  }
  auto one = [&](int64_t i, int64_t j) {
    T& cij = c[i * rsc + j * csc];
    T r = alpha * tmp[i * ldt + j];
    if (beta != T(0)) r += beta * cij;
    if (bias_n) r += bias_n[j];
    if (bias_m) r += bias_m[i];
    cij = r;
  };
  if ((rsc < 0 ? -rsc : rsc) < (csc < 0 ? -csc : csc)) {
    for (int64_t j = 0; j < nr; ++j)
      for (int64_t i = 0; i < mr; ++i) one(i, j);
  } else {
    for (int64_t i = 0; i < mr; ++i)
      for (int64_t j = 0; j < nr; ++j) one(i, j);
  }
}

// What one thread needs to run blocks of C: the product, the kernel, the plan and its buffers.
template <class T>
struct Worker {
  const Gemm<T>& g;
  const GemmUKernel<T>& uk;
  const Plan& p;
  T* abuf;  // packed A block (when A is packed)
  T* ebuf;  // one edge B panel when B is read in place
  T* tmp;   // one MR x NR tile for edge stores
  // The narrow kernel when it has the same MR and half the NR (it then reads the wide kernel's
  // packed B panels, rsb = NR): an edge panel of at most NR/2 columns runs it, not the full width
  // (N = 200 on the 32-wide AVX-512 kernel: the last 8 columns cost 16, not 32).
  const GemmUKernel<T>* half;

  // Rows [i0, i1) x NR panels [q0, q1) of the column block at jc, for the K block [pc, pc + kc).
  // bblock is that K block's packed B from panel bq on (unused when B is read in place).
  void block(int64_t jc, int64_t pc, int64_t kc, const T* bblock, int64_t bq, int64_t i0,
             int64_t i1, int64_t q0, int64_t q1) const {
    const int64_t MR = uk.mr, NR = uk.nr;
    // The first K block applies beta and the biases; later ones accumulate.
    const bool first = pc == 0;
    const T beta = first ? g.beta : T(1);
    const T* bias_m = first ? g.bias_m : nullptr;
    const T* bias_n = first ? g.bias_n : nullptr;
    for (int64_t ic = i0; ic < i1; ic += p.mc) {
      const int64_t mc = min64(p.mc, i1 - ic);
      if (p.pack_a) uk.pack_a(mc, kc, g.A + ic * g.rsa + pc * g.csa, g.rsa, g.csa, abuf);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t j = jc + q * NR, nr = min64(NR, g.N - j);
        // The B micro-panel: packed, B itself (row-major), or a packed copy of a partial panel.
        const T* bp = bblock + (q - bq) * NR * kc;
        int64_t rsb = NR;
        if (!p.pack_b) {
          if (nr == NR) {
            bp = g.B + pc * g.rsb + j;
            rsb = g.rsb;
          } else {
            uk.pack_b(kc, nr, g.B + pc * g.rsb + j, g.rsb, 1, ebuf);
            bp = ebuf;
          }
        }
        const T* bn = bias_n ? bias_n + j : nullptr;
        for (int64_t ir = 0; ir < mc; ir += MR) {
          const int64_t i = ic + ir, mr = min64(MR, mc - ir);
          const T* bm = bias_m ? bias_m + i : nullptr;
          T* c = g.C + i * g.rsc + j * g.csc;
          // Tiles of NR columns of a unit-stride C are stored by the kernel (a short edge of rows
          // by its edge-row instance); others go through tmp.
          const bool direct = nr == NR && g.csc == 1;
          T* dst = direct ? c : tmp;
          const int64_t ldd = direct ? g.rsc : NR;
          const T alpha_d = direct ? g.alpha : T(1), beta_d = direct ? beta : T(0);
          const T* bm_d = direct ? bm : nullptr;
          const T* bn_d = direct ? bn : nullptr;
          const T* a = g.A + (g.a_rows ? 0 : i * g.rsa) + (g.a_cols ? 0 : pc * g.csa);
          const int64_t* arow = g.a_rows ? g.a_rows + i : nullptr;
          const int64_t* acol = g.a_cols ? g.a_cols + pc : nullptr;
          const GemmUKernel<T>& ku = half && nr <= half->nr ? *half : uk;
          if (p.pack_a) {
            const auto tile = mr == MR ? ku.tile : ku.tile_rows[mr];
            tile(kc, abuf + ir * kc, bp, rsb, dst, ldd, alpha_d, beta_d, bm_d, bn_d);
          } else {
            const auto tile = mr == MR ? ku.tile_strided_a : ku.tile_strided_a_rows[mr];
            tile(kc, a, g.rsa, g.csa, arow, acol, bp, rsb, dst, ldd, alpha_d, beta_d, bm_d, bn_d);
          }
          if (!direct) store_edge(tmp, NR, mr, nr, c, g.rsc, g.csc, g.alpha, beta, bm, bn);
        }
      }
    }
  }
};

template <class T>
void run_thread(const Gemm<T>& g, const GemmUKernel<T>& uk, const Plan& p, T* ws, int tid) {
  const int64_t NR = uk.nr;
  // This thread's rows and NR panels of each column block.
  const int it = tid / p.tn, jt = tid % p.tn;
  T* bpack = ws + (p.own_b ? tid * p.bsize : 0);
  T* abuf = ws + p.bsize * (p.own_b ? p.nt : 1) + int64_t(tid) * p.per_thread;
  alignas(64) T tmp[kMaxTileElems];
  const Worker<T> w{g, uk, p, abuf, abuf + (p.pack_a ? p.mc : 0) * p.kc, tmp, half_kernel(uk)};

  int64_t m0, m1;  // an even share of the rows; its last tile may be an edge tile
  split_range(g.M, p.tm, it, &m0, &m1);

  for (int64_t jc = 0; jc < g.N; jc += p.nc) {
    const int64_t nc = min64(p.nc, g.N - jc), npanels = ceil_div(nc, NR);
    int64_t q0, q1;
    split_range(npanels, p.tn, jt, &q0, &q1);
    // Panels in the packed buffer: from panel qbase on (own B holds only this thread's).
    const int64_t qbase = p.own_b ? q0 : 0, bpanels = p.own_b ? q1 - q0 : npanels;
    // Packs the K block starting at pc into `dst`; this thread's share of the NR panels.
    auto pack_b_block = [&](int64_t pc, T* dst) {
      const int64_t kc = min64(p.kc, g.K - pc);
      int64_t s0 = q0, s1 = q1;
      if (!p.own_b) split_range(npanels, p.nt, tid, &s0, &s1);
      if (s0 >= s1) return;
      const int64_t n = min64(nc, s1 * NR) - s0 * NR;
      if (g.pack_b_fn)
        g.pack_b_fn(g.pack_b_ctx, pc, kc, jc + s0 * NR, n, int(NR), dst + (s0 - qbase) * NR * kc);
      else
        uk.pack_b(kc, n, g.B + pc * g.rsb + (jc + s0 * NR) * g.csb, g.rsb, g.csb,
                  dst + (s0 - qbase) * NR * kc);
    };
    if (p.whole_k) {
      // Block pc lives at bpack + pc * (npanels * NR): the blocks before it hold pc rows of K.
      for (int64_t pc = 0; pc < g.K; pc += p.kc) pack_b_block(pc, bpack + pc * bpanels * NR);
      if (!p.own_b) team_barrier(p.nt);
    }
    for (int64_t pc = 0; pc < g.K; pc += p.kc) {
      const T* bblock = bpack;
      int64_t bq = qbase;  // the panel bblock starts at
      if (g.packed_b) {    // packed ahead: column block jc starts after jc columns of all of K
        bblock = g.packed_b + jc * g.K + pc * npanels * NR;
        bq = 0;
      } else if (p.whole_k) {
        bblock += pc * bpanels * NR;
      } else if (p.bsize) {
        pack_b_block(pc, bpack);
        if (!p.own_b) team_barrier(p.nt);
      }
      w.block(jc, pc, min64(p.kc, g.K - pc), bblock, bq, m0, m1, q0, q1);
      // before the next block overwrites it
      if (p.bsize && !p.whole_k && !p.own_b) team_barrier(p.nt);
    }
    if (p.whole_k && jc + p.nc < g.N && !p.own_b) team_barrier(p.nt);
  }
}

template <class T>
void run(const Gemm<T>& g, const GemmUKernel<T>& uk, const Plan& p, T* ws) {
  team_run(p.nt, [&](int tid, int team) {
    // A short team cannot run a split made for p.nt threads: its thread 0 runs every tile alone.
    if (team == p.nt) {
      run_thread(g, uk, p, ws, tid);
    } else if (tid == 0) {
      // One thread packs every panel: own_b's buffer holds one column share only; the shared
      // layout fits the workspace (nt own buffers hold at least all nc columns).
      Plan one = p;
      one.nt = one.tm = one.tn = 1;
      if (one.own_b) {
        one.own_b = false;
        one.bsize = size_t((p.whole_k ? g.K : p.kc) * p.nc);
      }
      run_thread(g, uk, one, ws, 0);
    }
  });
}

inline int resolve_threads(int nthreads) {
  if (in_parallel_region()) return 1;
  return nthreads > 0 ? nthreads : num_threads();
}

}  // namespace

// A few columns, with A's rows and B's columns contiguous in k: GemmUKernel::dot_rows.
template <class T>
bool dot_shaped(const Gemm<T>& g) {
  return g.N <= kDotCols && g.csa == 1 && g.rsb == 1 && !g.pack_b_fn && !g.packed_b && !g.a_rows &&
         !g.a_cols && g.K >= kDotMinK;
}

template <class T>
void run_dots(const Gemm<T>& g, const GemmUKernel<T>& uk, int nt) {
  const double flops = 2.0 * double(g.M) * double(g.N) * double(g.K);
  const int64_t by_work = int64_t(flops / kMinFlopsPerThread);
  if (by_work < nt) nt = by_work < 1 ? 1 : int(by_work);
  const int64_t blocks = ceil_div(g.M, 4);  // dot_rows takes rows four at a time
  parallel_for(
      blocks, 1,
      [&](int64_t b0, int64_t b1) {
        const int64_t i0 = b0 * 4, i1 = min64(g.M, b1 * 4);
        uk.dot_rows(i1 - i0, g.K, g.N, g.A + i0 * g.rsa, g.rsa, g.B, g.csb, g.C + i0 * g.rsc, g.rsc,
                    g.csc, g.alpha, g.beta, g.bias_m ? g.bias_m + i0 : nullptr, g.bias_n);
      },
      nt);
}

template <class T>
size_t gemm_workspace(const Gemm<T>& g, int nthreads) {
  if (g.M <= 0 || g.N <= 0 || g.K <= 0 || g.alpha == T(0)) return 0;
  const GemmUKernel<T>& uk = gemm_ukernel_for<T>(g.N);
  const Gemm<T> h = oriented(g, uk);
  return dot_shaped(h) ? 0 : make_plan(h, uk, resolve_threads(nthreads)).workspace;
}

template <class T>
void gemm(const Gemm<T>& g, int nthreads, T* workspace) {
  if (g.M <= 0 || g.N <= 0) return;
  if (g.K <= 0 || g.alpha == T(0)) {
    scale_only(g);
    return;
  }
  const GemmUKernel<T>& uk = gemm_ukernel_for<T>(g.N);
  const Gemm<T> h = oriented(g, uk);
  if (dot_shaped(h)) return run_dots(h, uk, resolve_threads(nthreads));
  run(h, uk, make_plan(h, uk, resolve_threads(nthreads)), workspace);
}

template <class T>
void gemm(const Gemm<T>& g, int nthreads) {
  const size_t ws = gemm_workspace(g, nthreads);
  gemm(g, nthreads, ws ? thread_scratch<T>(Scratch::gemm, ws) : nullptr);
}

template <class T>
void gemm_batched(const Gemm<T>& g, int64_t batch, int64_t sa, int64_t sb, int64_t sc, int nthreads,
                  T* workspace) {
  if (batch <= 0 || g.M <= 0 || g.N <= 0) return;
  const int nt = resolve_threads(nthreads);
  auto item = [&](int64_t b) {
    Gemm<T> gb = g;
    gb.A += b * sa;
    gb.B += b * sb;
    gb.C += b * sc;
    return gb;
  };
  // Items too small to keep every thread busy run whole, one per thread, side by side; so do
  // mid-sized items when there are at least two per thread (Winograd's 16 products of 128^3:
  // a fork, a join and barriers per product cost more than the imbalance of whole items).
  const double item_flops = 2.0 * double(g.M) * double(g.N) * double(g.K);
  const bool large = item_flops > nt * (batch >= 2 * nt ? 64 : 8) * kMinFlopsPerThread;
  if (nt == 1 && workspace) {
    for (int64_t b = 0; b < batch; ++b) gemm(item(b), 1, workspace);
    return;
  }
  if (nt == 1 || batch < nt || large) {
    for (int64_t b = 0; b < batch; ++b) gemm(item(b), nt);
    return;
  }
  const size_t per = gemm_workspace(g, 1);
  T* ws = per ? thread_scratch<T>(Scratch::gemm, per * nt) : nullptr;
  parallel_for(
      batch, 1,
      [&](int64_t b0, int64_t b1) {
        T* mine = ws ? ws + per * thread_id() : nullptr;
        for (int64_t b = b0; b < b1; ++b) gemm(item(b), 1, mine);
      },
      nt);
}

template <class T>
size_t gemm_packed_b_size(int64_t K, int64_t N) {
  const GemmUKernel<T>& uk = gemm_ukernel_for<T>(N);
  return K <= 0 || N <= 0 ? 0 : size_t(K * round_up(N, uk.nr));
}

// The layout run_thread reads: column block jc (nc columns) at dst + jc * K; inside it the K
// block pc at + pc * npanels * NR, and its NR panels of kc x NR one after another.
template <class T>
void gemm_pack_b(int64_t K, int64_t N, const T* B, int64_t rsb, int64_t csb, T* dst, int nthreads) {
  if (K <= 0 || N <= 0) return;
  const GemmUKernel<T>& uk = gemm_ukernel_for<T>(N);
  const int64_t NR = uk.nr;
  const Blocks b = kn_blocks(K, N, uk);
  const int64_t per_block = b.nc / NR;
  parallel_for(
      ceil_div(N, NR), 8,
      [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t j = q * NR, jc = j / b.nc * b.nc, nr = min64(NR, N - j);
          const int64_t npanels = min64(per_block, ceil_div(N - jc, NR));
          for (int64_t pc = 0; pc < K; pc += b.kc) {
            const int64_t kc = min64(b.kc, K - pc);
            uk.pack_b(kc, nr, B + pc * rsb + j * csb, rsb, csb,
                      dst + jc * K + pc * npanels * NR + (q - jc / NR) * kc * NR);
          }
        }
      },
      resolve_threads(nthreads));
}

template <class T>
const char* gemm_kernel_name() {
  return active_gemm_ukernel<T>().name;
}

#define NNK_INSTANTIATE_GEMM(T)                                                               \
  template size_t gemm_workspace<T>(const Gemm<T>&, int);                                     \
  template void gemm<T>(const Gemm<T>&, int, T*);                                             \
  template void gemm<T>(const Gemm<T>&, int);                                                 \
  template void gemm_batched<T>(const Gemm<T>&, int64_t, int64_t, int64_t, int64_t, int, T*); \
  template size_t gemm_packed_b_size<T>(int64_t, int64_t);                                    \
  template void gemm_pack_b<T>(int64_t, int64_t, const T*, int64_t, int64_t, T*, int);        \
  template const char* gemm_kernel_name<T>();                                                 \
  template const GemmUKernel<T>& active_gemm_ukernel<T>();
NNK_INSTANTIATE_GEMM(float)
NNK_INSTANTIATE_GEMM(double)

}  // namespace cpu
}  // namespace nnk
#endif  // NNK_BASELINE_PASS
