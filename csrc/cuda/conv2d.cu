// conv2d on CUDA: implicit-GEMM forward, backward-data and backward-weight on the tile kernel of
// gemm_tile.cuh (the project's one GPU GEMM), with operand providers that read x, w and dY through
// the index math of common/conv2d_args.h instead of a materialised im2col:
//   forward          items n*groups + g:  Y[n]_g = W_g . col(x[n]_g)                   + bias
//   backward-data    items n*groups + g:  dX[n]_g = W~_g . gather(dY[n]_g)   (any stride, dilation)
//   backward-weight  items g*ksplit + s:  dW_g += dY_g . col^T (K split in ksplit slices, atomics)
// Implicit operands load scalars (consecutive threads on consecutive pixels, so loads coalesce
// along the image rows); the weight of the forward is a strided operand (float4 along k).
#include <cstdint>

#include "common/conv2d_args.h"
#include "cuda/common.cuh"
#include "cuda/cuda_api.h"
#include "cuda/gemm_epilogue.cuh"
#include "cuda/gemm_tile.cuh"

namespace nnk {
namespace cuda {
namespace {

using namespace tile;

// Element functions of the implicit operands (gemm_tile.cuh's Implicit<F>): f(item, w, k).

// Forward B: col[crs = k][pix = w] of item (n, g).
struct Im2col {
  Conv2dArgs ix;
  const float* x;
  __device__ float operator()(int64_t item, int64_t pix, int64_t crs) const {
    const int64_t n = item / ix.groups,
                  off = pix < ix.P * ix.Q ? ix.col(n, item - n * ix.groups, crs, pix) : -1;
    return off >= 0 ? x[off] : 0.f;
  }
};

// Backward-data A: W~[c = w][krs = k] of group g.
struct WeightT {
  Conv2dArgs ix;
  const float* w;
  __device__ float operator()(int64_t item, int64_t c, int64_t krs) const {
    return c < ix.Cg ? w[ix.weight_t(item % ix.groups, c, krs)] : 0.f;
  }
};

// Backward-data B: gather(dY)[krs = k][pix = w] of item (n, g), pix over the input's H x W.
struct DyGather {
  Conv2dArgs ix;
  const float* dy;
  __device__ float operator()(int64_t item, int64_t pix, int64_t krs) const {
    const int64_t n = item / ix.groups;
    const int64_t off = pix < ix.H * ix.W ? ix.dy_gather(n, item - n * ix.groups, krs, pix) : -1;
    return off >= 0 ? dy[off] : 0.f;
  }
};

// Backward-weight A: dY[m = w][(n, pix) = k] of group g = item / ksplit.
struct DyRow {
  Conv2dArgs ix;
  const float* dy;
  int64_t ksplit;
  __device__ float operator()(int64_t item, int64_t m, int64_t npix) const {
    return m < ix.Kg ? dy[ix.dy_row(item / ksplit, m, npix)] : 0.f;
  }
};

// Backward-weight B: col^T[(n, pix) = k][crs = w] of group g = item / ksplit.
struct ColT {
  Conv2dArgs ix;
  const float* x;
  int64_t ksplit;
  __device__ float operator()(int64_t item, int64_t crs, int64_t npix) const {
    const int64_t off = crs < ix.Cg * ix.R * ix.S ? ix.col_t(item / ksplit, npix, crs) : -1;
    return off >= 0 ? x[off] : 0.f;
  }
};

// out[k*rs + j*cs] = 0 for k < rows, j < cols.
__global__ void zero_2d(float* out, int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * cols;
       i += int64_t(gridDim.x) * blockDim.x)
    out[(i / cols) * rs + (i % cols) * cs] = 0.f;
}

// out[c] = sum_{n, i} x[n*sn + c*sc + i*si]: one block per channel, float64 partials in shared
// memory (deterministic).
__global__ void sum_channels_kernel(int64_t N, int64_t HW, const float* x, int64_t sn, int64_t sc,
                                    int64_t si, float* out) {
  __shared__ double part[256];
  const int64_t c = blockIdx.x;
  double acc = 0;
  for (int64_t i = threadIdx.x; i < N * HW; i += blockDim.x) {
    const int64_t n = i / HW;
    acc += double(x[n * sn + c * sc + (i - n * HW) * si]);
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (int(threadIdx.x) < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[c] = float(part[0]);
}

template <class P>
void launch(const P& pr, cudaStream_t stream, const char* what) {
  gemm_kernel<<<grid_for(pr), THREADS, 0, stream>>>(pr);
  check(cudaGetLastError(), what);
}

}  // namespace

void conv2d_forward(const Conv2dArgs& ix, const float* x, const float* w, const float* bias,
                    float* y, int device, void* stream) {
  if (ix.N == 0 || ix.K == 0 || ix.P * ix.Q == 0) return;
  Problem<Strided, Implicit<Im2col>, StoreC> pr;
  pr.M = ix.Kg;
  pr.N = ix.P * ix.Q;
  pr.K = ix.Cg * ix.R * ix.S;
  pr.items = ix.N * ix.groups;
  pr.ksplit = 1;
  // A = W_g: element (k, crs) at w + g*Kg*ws0 + k*ws0 + crs*ws3 ((c, r, s) flatten, checked).
  pr.a.base = w;
  pr.a.ws = ix.ws[0];
  pr.a.ks = ix.ws[3];
  pr.a.W = ix.Kg;
  pr.a.off.inner = ix.groups;
  pr.a.off.s_inner = ix.Kg * ix.ws[0];
  pr.a.mode = (ix.ws[3] == 1 && ix.ws[0] % 4 == 0 && (reinterpret_cast<uintptr_t>(w) & 15) == 0)
                  ? kVecK
                  : kAlongK;
  pr.b = {Im2col{ix, x}, kWide};  // consecutive threads on consecutive pixels
  pr.epi.C = y;
  pr.epi.rsc = ix.ys[1];
  pr.epi.csc = ix.ys[3];  // (P, Q) flatten (checked by the binding)
  pr.epi.M = ix.Kg;
  pr.epi.N = ix.P * ix.Q;
  pr.epi.off.inner = ix.groups;
  pr.epi.off.s_outer = ix.ys[0];
  pr.epi.off.s_inner = ix.Kg * ix.ys[1];
  pr.epi.bias_m = bias;
  pr.epi.bias_off.inner = ix.groups;
  pr.epi.bias_off.s_inner = ix.Kg;
  DeviceGuard guard(device);
  launch(pr, static_cast<cudaStream_t>(stream), "conv2d forward launch");
}

void conv2d_backward_data(const Conv2dArgs& ix, const float* dy, const float* w, float* dx,
                          int device, void* stream) {
  if (ix.N == 0 || ix.C == 0 || ix.H * ix.W == 0) return;
  Problem<Implicit<WeightT>, Implicit<DyGather>, StoreC> pr;
  pr.M = ix.Cg;
  pr.N = ix.H * ix.W;
  pr.K = ix.Kg * ix.R * ix.S;
  pr.items = ix.N * ix.groups;
  pr.ksplit = 1;
  pr.a = {WeightT{ix, w}, kAlongK};
  pr.b = {DyGather{ix, dy}, kWide};
  pr.epi.C = dx;
  pr.epi.rsc = ix.xs[1];
  pr.epi.csc = ix.xs[3];  // (H, W) of dx flatten (checked by the binding)
  pr.epi.M = ix.Cg;
  pr.epi.N = ix.H * ix.W;
  pr.epi.off.inner = ix.groups;
  pr.epi.off.s_outer = ix.xs[0];
  pr.epi.off.s_inner = ix.Cg * ix.xs[1];
  DeviceGuard guard(device);
  launch(pr, static_cast<cudaStream_t>(stream), "conv2d backward-data launch");
}

void conv2d_backward_weight(const Conv2dArgs& ix, const float* x, const float* dy, float* dw,
                            float* dbias, int device, void* stream) {
  DeviceGuard guard(device);
  const auto st = static_cast<cudaStream_t>(stream);
  const int64_t PQ = ix.P * ix.Q, CRS = ix.Cg * ix.R * ix.S;
  if (dbias && ix.K > 0) {
    sum_channels_kernel<<<static_cast<unsigned>(ix.K), 256, 0, st>>>(ix.N, PQ, dy, ix.ys[0],
                                                                     ix.ys[1], ix.ys[3], dbias);
    check(cudaGetLastError(), "conv2d bias-gradient launch");
  }
  if (ix.K == 0 || CRS == 0) return;
  zero_2d<<<256, 256, 0, st>>>(dw, ix.K, CRS, ix.ws[0], ix.ws[3]);
  check(cudaGetLastError(), "conv2d weight-gradient zero launch");
  const int64_t K = ix.N * PQ;
  if (K == 0) return;
  // Split the reduction (every image and pixel) so that the few output tiles still fill the
  // GPU: about 256 blocks, slices of at least 1024 steps.
  const int64_t tiles = ((ix.Kg + BM - 1) / BM) * ((CRS + BN - 1) / BN) * ix.groups;
  int64_t ksplit = (256 + tiles - 1) / tiles;
  const int64_t most = (K + 1023) / 1024;
  if (ksplit > most) ksplit = most;
  if (ksplit < 1) ksplit = 1;
  Problem<Implicit<DyRow>, Implicit<ColT>, AddC> pr;
  pr.M = ix.Kg;
  pr.N = CRS;
  pr.K = K;
  pr.items = ix.groups * ksplit;
  pr.ksplit = ksplit;
  pr.a = {DyRow{ix, dy, ksplit}, kAlongK};  // consecutive threads on consecutive pixels
  pr.b = {ColT{ix, x, ksplit}, kAlongK};
  pr.epi.C = dw;
  pr.epi.rsc = ix.ws[0];
  pr.epi.csc = ix.ws[3];
  pr.epi.M = ix.Kg;
  pr.epi.N = CRS;
  pr.epi.off.inner = ksplit;
  pr.epi.off.s_outer = ix.Kg * ix.ws[0];
  launch(pr, st, "conv2d backward-weight launch");
}

void sum_channels(int64_t N, int64_t C, int64_t HW, const float* x, int64_t sn, int64_t sc,
                  int64_t si, float* out, int device, void* stream) {
  if (C == 0) return;
  DeviceGuard guard(device);
  sum_channels_kernel<<<static_cast<unsigned>(C), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      N, HW, x, sn, sc, si, out);
  check(cudaGetLastError(), "sum_channels launch");
}

}  // namespace cuda
}  // namespace nnk
