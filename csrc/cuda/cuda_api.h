// The CUDA runtime facts and the shared machinery of the CUDA kernels (GEMM, reductions), callable
// from host code compiled without CUDA headers. Each op's own CUDA entry points are declared with
// its CPU ones (cpu/<op>.h). Every launch goes on the stream the caller passes (torch's current
// stream) on the given device; errors are thrown as std::runtime_error. The declarations exist in
// every build; only builds with CUDA define them, and the bindings call them only there.
#pragma once
#include <cstdint>
#include <string>

#include "common/gemm_args.h"

namespace nnk {
namespace cuda {

// runtime.cu
int device_count();            // 0 when there is no driver or no GPU; never throws
std::string compiled_archs();  // e.g. "80,90"

// gemm.cu: `batch` products, item b at A + b*sa, B + b*sb, C + b*sc (see common/gemm_args.h).
void sgemm(const Gemm<float>& g, int64_t batch, int64_t sa, int64_t sb, int64_t sc, int device,
           void* stream);

// conv2d.cu: out[c] = sum_{n, i} x[n*sn + c*sc + i*si] (the bias gradient of conv2d).
void sum_channels(int64_t N, int64_t C, int64_t HW, const float* x, int64_t sn, int64_t sc,
                  int64_t si, float* out, int device, void* stream);

// reduce.cu: out[j*so] = sum_i x[i*rsx + j*csx], i < R, j < N.
void sum_rows(int64_t R, int64_t N, const float* x, int64_t rsx, int64_t csx, float* out,
              int64_t so, int device, void* stream);

// batch_norm.cu: the reductions split each channel into at most this many parts; their float64
// partial sums (2 per part) live in a workspace of C * kBatchNormParts * 2 values that Python
// allocates (nnkernels._C.BATCH_NORM_CUDA_WORKSPACE_PER_CHANNEL per channel).
constexpr int kBatchNormParts = 64;

}  // namespace cuda
}  // namespace nnk
