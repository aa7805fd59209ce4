#include "cpu/peak.h"

#include <chrono>
#include <cstdint>

#include "common/threading.h"
#include "cpu/gemm_kernel.h"

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

}  // namespace cpu
}  // namespace nnk
