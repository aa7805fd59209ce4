// Column sums for the backward passes (bias gradients): out[j] = sum_i x[i, j].
// Block = 32 columns x 8 row lanes; each thread walks every 8th row of its column (coalesced along
// j when x is row-major), accumulating in double, then the 8 lanes are added in shared memory.
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/cuda_api.h"

namespace nnk {
namespace cuda {
namespace {

__global__ void sum_rows_kernel(int64_t R, int64_t N, const float* x, int64_t rsx, int64_t csx,
                                float* out, int64_t so) {
  __shared__ double part[8][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = int64_t(blockIdx.x) * 32 + tx;
  double acc = 0;
  if (j < N)
    for (int64_t i = ty; i < R; i += 8) acc += double(x[i * rsx + j * csx]);
  part[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < N) {
    double s = 0;
#pragma unroll
    for (int y = 0; y < 8; ++y) s += part[y][tx];
    out[j * so] = float(s);
  }
}

}  // namespace

void sum_rows(int64_t R, int64_t N, const float* x, int64_t rsx, int64_t csx, float* out,
              int64_t so, int device, void* stream) {
  if (N <= 0) return;
  DeviceGuard guard(device);
  sum_rows_kernel<<<ceil_div_u(N, 32), dim3(32, 8), 0, static_cast<cudaStream_t>(stream)>>>(
      R, N, x, rsx, csx, out, so);
  check(cudaGetLastError(), "sum_rows launch");
}

}  // namespace cuda
}  // namespace nnk
