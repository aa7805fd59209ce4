// Reductions shared by the backward passes (cpu/reduce.h): column sums (Linear's and the LSTM's
// bias gradients) and per-channel sums (conv2d's bias gradient).
//
// Both accumulate in float64, as before, but no longer convert every value: the per-ISA loops
// below add short blocks in T vectors (kRunBlock values of a run, kRowBlock rows of a column
// block; a float32 lane then sums at most 16 values, whose rounding stays far below torch's own
// float32 sums) and move each block's partial sums to float64. The double-per-value loop this
// replaces ran at ~2.4 G values/s on one core (the course CNN's first conv, 64 x 64 channels of
// 8 x 8: 111 us for its bias gradient where torch's sum took 40 us).
#include "common/simd.h"

namespace nnk {
namespace cpu {

template <class T>
struct ReduceKernels {
  // sum_{r < runs} sum_{i < n} x[r * stride + i] in float64 (unit stride within a run)
  double (*sum_runs)(const T* x, int64_t runs, int64_t stride, int64_t n);
  // acc[j] += sum_{i < R} x[i * rs + j] for j < n <= kSumCols (unit column stride)
  void (*add_rows)(const T* x, int64_t R, int64_t rs, int64_t n, double* acc);
};

// Columns per work item of sum_rows: one block of acc per item.
constexpr int64_t kSumCols = 64;

}  // namespace cpu
}  // namespace nnk

// ============================================================ SIMD loops (compiled once per ISA)
namespace nnk {
namespace NNK_ISA_NS {

template <class T>
struct ReduceLoops {
  using S = Simd<T>;
  using V = typename S::V;
  static constexpr int W = S::W;
  static constexpr int64_t kRunBlock = 16 * 4 * W;  // 4 accumulators, 16 values per lane
  static constexpr int64_t kRowBlock = 16;
  static constexpr int kColVecs = int(cpu::kSumCols / W);

  // sum_{r < runs} sum_{i < n} x[r * stride + i]: the vector partial sums carry across runs (a
  // conv's 8 x 8 planes are 64 values each), moved to float64 every kRunBlock values.
  static double sum_runs(const T* x, int64_t runs, int64_t stride, int64_t n) {
    double total = 0;
    V a0 = S::zero(), a1 = S::zero(), a2 = S::zero(), a3 = S::zero();
    int64_t in_block = 0;
    auto flush = [&] {
      total += S::reduce_add_f64(S::add(S::add(a0, a1), S::add(a2, a3)));
      a0 = a1 = a2 = a3 = S::zero();
      in_block = 0;
    };
    for (int64_t r = 0; r < runs; ++r) {
      const T* p = x + r * stride;
      int64_t i = 0;
      for (; i + 4 * W <= n; i += 4 * W) {
        a0 = S::add(a0, S::load(p + i));
        a1 = S::add(a1, S::load(p + i + W));
        a2 = S::add(a2, S::load(p + i + 2 * W));
        a3 = S::add(a3, S::load(p + i + 3 * W));
        if ((in_block += 4 * W) >= kRunBlock) flush();
      }
      for (; i + W <= n; i += W) {
        a0 = S::add(a0, S::load(p + i));
        if ((in_block += 4 * W) >= kRunBlock) flush();  // counted as 4: a0 alone takes them
      }
      for (; i < n; ++i) total += double(p[i]);
    }
    flush();
    return total;
  }

  static void add_rows(const T* x, int64_t R, int64_t rs, int64_t n, double* acc) {
    const int64_t nv = n / W;  // whole vectors of the block's columns
    for (int64_t i0 = 0; i0 < R; i0 += kRowBlock) {
      const int64_t i1 = lo(R, i0 + kRowBlock);
      V a[kColVecs];
      for (int v = 0; v < kColVecs; ++v) a[v] = S::zero();
      for (int64_t i = i0; i < i1; ++i) {
        const T* row = x + i * rs;
        for (int64_t v = 0; v < nv; ++v) a[v] = S::add(a[v], S::load(row + v * W));
      }
      alignas(64) T part[W];
      for (int64_t v = 0; v < nv; ++v) {
        S::store(part, a[v]);
        for (int l = 0; l < W; ++l) acc[v * W + l] += double(part[l]);
      }
      for (int64_t j = nv * W; j < n; ++j) {
        double s = 0;
        for (int64_t i = i0; i < i1; ++i) s += double(x[i * rs + j]);
        acc[j] += s;
      }
    }
  }

  static constexpr cpu::ReduceKernels<T> table() { return {&sum_runs, &add_rows}; }
};

NNK_ISA_TABLE(reduce_kernels, cpu::ReduceKernels, ReduceLoops)

}  // namespace NNK_ISA_NS
}  // namespace nnk

// ======================================================================== driver (compiled once)
#if NNK_BASELINE_PASS
#include <cstddef>
#include <vector>

#include "common/isa.h"
#include "common/threading.h"
#include "cpu/gemm.h"
#include "cpu/reduce.h"

namespace nnk {
NNK_PER_ISA(template <class T> const cpu::ReduceKernels<T>& reduce_kernels())
}  // namespace nnk

namespace nnk {
namespace cpu {

template <class T>
void sum_rows(int64_t R, int64_t N, const T* x, int64_t rsx, int64_t csx, T* out, int64_t so) {
  if (N <= 0) return;
  // Work items: (row split r, column chunk of CW). Rows are split only when there are too few
  // column chunks to keep the threads busy; the row partials are then added in a fixed order,
  // so the result does not depend on the thread count.
  constexpr int64_t CW = kSumCols;
  const auto& k = NNK_ISA_CALL(reduce_kernels<T>());
  const int64_t chunks = (N + CW - 1) / CW;
  const int nt = num_threads();
  int64_t splits = 1;
  if (chunks < nt && R >= 1024) splits = (nt + chunks - 1) / chunks;
  std::vector<double> partial(size_t(splits * N));

  const int64_t items = splits * chunks;
  parallel_for(items, (1 << 15) / CW / (R > 0 ? R : 1) + 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t r = w / chunks, ch = w % chunks;
      int64_t i0, i1;
      split_range(R, int(splits), int(r), &i0, &i1);
      const int64_t j0 = ch * CW, nj = N - j0 < CW ? N - j0 : CW;
      double acc[CW] = {};
      if (csx == 1) {
        k.add_rows(x + i0 * rsx + j0, i1 - i0, rsx, nj, acc);
      } else {
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = 0; j < nj; ++j) acc[j] += double(x[i * rsx + (j0 + j) * csx]);
      }
      for (int64_t j = 0; j < nj; ++j) partial[size_t(r * N + j0 + j)] = acc[j];
    }
  });
  for (int64_t j = 0; j < N; ++j) {
    double s = 0;
    for (int64_t r = 0; r < splits; ++r) s += partial[size_t(r * N + j)];
    out[j * so] = T(s);
  }
}

template <class T>
void sum_channels(int64_t N, int64_t C, int64_t HW, const T* x, int64_t sn, int64_t sc, int64_t si,
                  T* out) {
  // Channels innermost (channels_last): the column sums of an (N HW) x C matrix.
  if (sc == 1 && si != 1 && C > 1 && (N <= 1 || sn == HW * si)) {
    sum_rows(N * HW, C, x, si, int64_t(1), out, int64_t(1));
    return;
  }
  const auto& k = NNK_ISA_CALL(reduce_kernels<T>());
  // One channel per work item, its N * HW values summed in float64.
  parallel_for(C, N * HW >= 4096 ? 1 : 64, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const T* p = x + c * sc;
      if (si == 1) {
        out[c] = T(k.sum_runs(p, N, sn, HW));
        continue;
      }
      double acc = 0;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t i = 0; i < HW; ++i) acc += double(p[n * sn + i * si]);
      out[c] = T(acc);
    }
  });
}

void sum_channels_bf16(int64_t N, int64_t C, int64_t HW, const uint16_t* x, int64_t sn, int64_t sc,
                       int64_t si, uint16_t* out) {
  if (sc == 1 && si != 1 && C > 1 && (N <= 1 || sn == HW * si)) {
    sum_rows_bf16(N * HW, C, x, si, int64_t(1), out, int64_t(1));
    return;
  }
  parallel_for(C, N * HW >= 4096 ? 1 : 64, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double acc = 0;
      for (int64_t n = 0; n < N; ++n) {
        const uint16_t* p = x + c * sc + n * sn;
        float part = 0;  // one image's plane in float32, the planes in float64
        for (int64_t i = 0; i < HW; ++i) part += bf16_to_f32(p[i * si]);
        acc += part;
      }
      out[c] = f32_to_bf16(float(acc));
    }
  });
}

template void sum_channels<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                                  int64_t, float*);
template void sum_channels<double>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t,
                                   int64_t, double*);
template void sum_rows<float>(int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t);
template void sum_rows<double>(int64_t, int64_t, const double*, int64_t, int64_t, double*, int64_t);

}  // namespace cpu
}  // namespace nnk
#endif
