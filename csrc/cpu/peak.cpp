#include "cpu/peak.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common/threading.h"
#include "cpu/gemm.h"

namespace nnk {
namespace cpu {

template <class T>
static double peak(int nthreads, double seconds) {
  const GemmUKernel<T>& uk = active_gemm_ukernel<T>();
  const int nt = nthreads > 0 ? nthreads : num_threads();
  alignas(64) T sink[64];
  using clock = std::chrono::steady_clock;
  // Calibrate on one thread, then run every thread for about `seconds`.
  int64_t iters = 1 << 16;
  for (;;) {
    const auto t0 = clock::now();
    uk.fma_loop(iters, sink);
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    if (dt > 0.02 || iters > (int64_t(1) << 40)) {
      iters = int64_t(double(iters) * seconds / (dt > 0 ? dt : 1e-9)) + 1;
      break;
    }
    iters *= 4;
  }
  int64_t flops = 0;
  const auto t0 = clock::now();
  parallel_for(
      nt, 1,
      [&](int64_t b, int64_t e) {
        alignas(64) T mine[64];
        int64_t f = 0;
        for (int64_t i = b; i < e; ++i) f += uk.fma_loop(iters, mine);
#if defined(_OPENMP)
#pragma omp atomic
#endif
        flops += f;
      },
      nt);
  const double dt = std::chrono::duration<double>(clock::now() - t0).count();
  return double(flops) / dt * 1e-9;
}

double fma_peak_gflops(bool fp64, int nthreads, double seconds) {
  return fp64 ? peak<double>(nthreads, seconds) : peak<float>(nthreads, seconds);
}

double copy_bandwidth_gbs(int64_t bytes, int reps, int nthreads) {
  const int nt = nthreads > 0 ? nthreads : num_threads();
  const int64_t n = std::max<int64_t>(bytes / 8, 64) / 16 * 16;  // floats per buffer, 64-B lines
  std::unique_ptr<float[]> a(new float[size_t(n) + 16]), b(new float[size_t(n) + 16]);
  auto align = [](float* p) {
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
  };
  float* src = align(a.get());
  float* dst = align(b.get());
  // First touch by the threads that copy (and page faults outside the timed copies).
  parallel_for(
      n, 1 << 16,
      [&](int64_t s, int64_t e) {
        std::fill(src + s, src + e, 1.0f);
        std::fill(dst + s, dst + e, 0.0f);
      },
      nt);
  using clock = std::chrono::steady_clock;
  double best = 1e30;
  for (int r = 0; r < std::max(reps, 1); ++r) {
    const auto t0 = clock::now();
    parallel_for(
        n / 16, 1024,
        [&](int64_t s, int64_t e) {
          for (int64_t i = s * 16; i < e * 16; i += 16) {
#if defined(__SSE2__)
            for (int k = 0; k < 16; k += 4) _mm_stream_ps(dst + i + k, _mm_load_ps(src + i + k));
#else
            std::copy(src + i, src + i + 16, dst + i);
#endif
          }
#if defined(__SSE2__)
          _mm_sfence();
#endif
        },
        nt);
    best = std::min(best, std::chrono::duration<double>(clock::now() - t0).count());
  }
  return 2.0 * double(n) * sizeof(float) / best * 1e-9;
}

}  // namespace cpu
}  // namespace nnk
