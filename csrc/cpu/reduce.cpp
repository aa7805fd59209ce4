#include "cpu/reduce.h"

#include <cstddef>
#include <vector>

#include "common/threading.h"

namespace nnk {
namespace cpu {

template <class T>
void sum_rows(int64_t R, int64_t N, const T* x, int64_t rsx, int64_t csx, T* out, int64_t so) {
  if (N <= 0) return;
  // Work items: (row split r, column chunk of CW). Rows are split only when there are too few
  // column chunks to keep the threads busy; the row partials are then added in a fixed order,
  // so the result does not depend on the thread count.
  constexpr int64_t CW = 64;
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
        for (int64_t i = i0; i < i1; ++i) {
          const T* row = x + i * rsx + j0;
          for (int64_t j = 0; j < nj; ++j) acc[j] += double(row[j]);
        }
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

// Sum of x[0..n) in float64 over 8 independent lanes (a vector of doubles per step, where one
// running sum would wait on every add's latency), then the lanes and the tail.
template <class T>
double sum_run(const T* x, int64_t n) {
  double lane[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += double(x[i + j]);
  double s =
      ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; i < n; ++i) s += double(x[i]);
  return s;
}

template <class T>
void sum_channels(int64_t N, int64_t C, int64_t HW, const T* x, int64_t sn, int64_t sc, int64_t si,
                  T* out) {
  // Channels innermost (channels_last): the column sums of an (N HW) x C matrix.
  if (sc == 1 && si != 1 && C > 1 && (N <= 1 || sn == HW * si)) {
    sum_rows(N * HW, C, x, si, int64_t(1), out, int64_t(1));
    return;
  }
  // One channel per work item, its N * HW values summed in float64.
  parallel_for(C, N * HW >= 4096 ? 1 : 64, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double acc = 0;
      for (int64_t n = 0; n < N; ++n) {
        const T* p = x + n * sn + c * sc;
        if (si == 1) {
          acc += sum_run(p, HW);
        } else {
          double part = 0;
          for (int64_t i = 0; i < HW; ++i) part += double(p[i * si]);
          acc += part;
        }
      }
      out[c] = T(acc);
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
