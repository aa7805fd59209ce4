// GEMM micro-kernel and packing, written once against Simd<T> (common/simd.h) and compiled once
// per ISA. Include after simd.h in a gemm_<isa>.cpp; everything lands in nnk::<isa>.
//
// Tile: MR rows x NR = NV*W columns of C held in MR*NV vector registers. Per k step the kernel
// loads NV vectors of the packed B row and, for each of the MR rows, broadcasts one packed A value
// and issues NV FMAs: MR*NV FMAs for NV loads + MR broadcasts.
//   AVX-512 f32 14x32: 28 accumulators + 2 B vectors (of 32 zmm).  AVX2 f32 6x16: 12 + 2 (of 16
//   ymm).
#pragma once
#include <cstdint>

#include "cpu/gemm_kernel.h"

namespace nnk {
namespace NNK_ISA_NS {

template <class T, int MR, int NV>
struct GemmTile {
  using S = Simd<T>;
  using V = typename S::V;
  static constexpr int W = S::W;
  static constexpr int NR = NV * W;
  static_assert(MR * NR <= cpu::kMaxTileElems, "tile larger than the driver's edge buffer");

  // One MR x NR tile of C over kc steps of k:
  //   C[i*rsc + j] = alpha * sum_k A(i, k) * b[k*rsb + j] + beta * C[i*rsc + j] (+ biases)
  // kPackedA: A(i, k) = a[k*MR + i] (a packed panel); otherwise A(i, k) = a[i*rsa + k*csa], read
  // in place (the driver's skinny paths). B rows are NR contiguous values, rsb apart: a packed
  // panel (rsb = NR) or B itself when it is row-major. beta == 0: C is not read.
  template <bool kPackedA>
  static NNK_INLINE void run(int64_t kc, const T* __restrict a, int64_t rsa, int64_t csa,
                             const T* __restrict b, int64_t rsb, T* __restrict c, int64_t rsc,
                             T alpha, T beta, const T* bias_m, const T* bias_n) {
    V acc[MR][NV];
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = S::zero();

    // C is written after the k loop; start fetching it now.
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      __builtin_prefetch(c + i * rsc, 1, 3);
      __builtin_prefetch(c + i * rsc + NR - 1, 1, 3);
    }

    const T* rows[MR];  // unpacked A: one pointer per row, stepped by csa
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) rows[i] = a + i * rsa;

#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k) {
      V bv[NV];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) bv[j] = S::load(b + j * W);
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i) {
        const V av = S::set1(kPackedA ? a[i] : *rows[i]);
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) acc[i][j] = S::fma(av, bv[j], acc[i][j]);
      }
      if (kPackedA) {
        a += MR;
      } else {
#pragma GCC unroll 32
        for (int i = 0; i < MR; ++i) rows[i] += csa;
      }
      b += rsb;
    }

    const V va = S::set1(alpha), vb = S::set1(beta);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
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

  static void tile(int64_t kc, const T* a, const T* b, int64_t rsb, T* c, int64_t rsc, T alpha,
                   T beta, const T* bias_m, const T* bias_n) {
    run<true>(kc, a, 0, 0, b, rsb, c, rsc, alpha, beta, bias_m, bias_n);
  }

  static void tile_strided_a(int64_t kc, const T* a, int64_t rsa, int64_t csa, const T* b,
                             int64_t rsb, T* c, int64_t rsc, T alpha, T beta, const T* bias_m,
                             const T* bias_n) {
    run<false>(kc, a, rsa, csa, b, rsb, c, rsc, alpha, beta, bias_m, bias_n);
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
        for (int64_t p = 0; p < k; ++p)
          for (int i = 0; i < MR; ++i) dst[p * MR + i] = i < mr ? src[i * rsa + p * csa] : T(0);
      }
    }
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
      } else if (nr == NR && rsb == 1) {
        // Columns contiguous in k (B = W^T of a row-major weight): a transpose. TB x TB blocks in
        // registers where the ISA has them, else blocks of 8 k steps so each source column is
        // read as a contiguous run; scalar for the k tail.
        int64_t p = 0;
#if defined(NNK_HAVE_BLOCK_TRANSPOSE)
        using BT = BlockTranspose<T>;
        static_assert(NR % BT::TB == 0, "B panels are whole transpose blocks");
        for (; p + BT::TB <= k; p += BT::TB)
#pragma GCC unroll 8
          for (int g = 0; g < NR; g += BT::TB)
            BT::template run<BT::TB>(src + g * csb + p, csb, dst + p * NR + g, NR);
#else
        for (; p + 8 <= k; p += 8)
          for (int j = 0; j < NR; ++j) {
            const T* col = src + j * csb + p;
#pragma GCC unroll 8
            for (int q = 0; q < 8; ++q) dst[(p + q) * NR + j] = col[q];
          }
#endif
        for (; p < k; ++p)
          for (int j = 0; j < NR; ++j) dst[p * NR + j] = src[j * csb + p];
      } else {
        for (int64_t p = 0; p < k; ++p)
          for (int j = 0; j < NR; ++j) dst[p * NR + j] = j < nr ? src[p * rsb + j * csb] : T(0);
      }
    }
  }
};

template <class T, int MR, int NV>
constexpr cpu::GemmUKernel<T> make_gemm_ukernel(const char* name, int mc, int kc, int nc) {
  using K = GemmTile<T, MR, NV>;
  return cpu::GemmUKernel<T>{name,       MR,         K::NR,       mc,
                             kc,         nc,         &K::tile,    &K::tile_strided_a,
                             &K::pack_a, &K::pack_b, &K::fma_loop};
}

}  // namespace NNK_ISA_NS
}  // namespace nnk
