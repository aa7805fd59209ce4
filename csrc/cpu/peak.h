// Measured FMA peak of this machine, for the benchmarks' "% of peak" column.
#pragma once

namespace nnk {
namespace cpu {

// GFLOP/s of the active ISA's FMA probe on `nthreads` threads (0: num_threads()), run for about
// `seconds`. fp32 when `fp64` is false.
double fma_peak_gflops(bool fp64, int nthreads, double seconds);

}  // namespace cpu
}  // namespace nnk
