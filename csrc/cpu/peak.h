// Measured peaks of this machine (FMA throughput, memory bandwidth), for the benchmarks' "% of
// peak" column.
#pragma once
#include <cstdint>

namespace nnk {
namespace cpu {

// GFLOP/s of the active ISA's FMA probe on `nthreads` threads (0: num_threads()), run for about
// `seconds`. fp32 when `fp64` is false.
double fma_peak_gflops(bool fp64, int nthreads, double seconds);

// Memory bandwidth of a STREAM-style copy with non-temporal stores on `nthreads` threads (0:
// num_threads()): GB/s of read + written bytes, best of `reps` copies of `bytes` (use far more
// than the last-level cache). The roofline of the memory-bound kernels, which also stream their
// outputs; a copy through the cache would also read every destination line before writing it.
double copy_bandwidth_gbs(int64_t bytes, int reps, int nthreads);

}  // namespace cpu
}  // namespace nnk
