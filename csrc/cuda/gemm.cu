// CUDA SGEMM (the project's one GEMM on the GPU; arguments in common/gemm_args.h).
//
// Block tile 128 x 128 x 8, 256 threads as a 16 x 16 grid, each thread an 8 x 8 register tile
// (rows ty*4+{0..3} and 64+ty*4+{0..3}, likewise columns, so shared-memory reads are float4 and
// conflict-free). Shared rows are padded to 132 floats so the transposing slab stores do not
// collide in one bank. Tiles are double-buffered in shared memory: the next k-slab is fetched into
// registers while the current one is multiplied. Global loads are float4 when the operand is
// contiguous along m/n or along k and 16-byte aligned, scalar (still coalesced along the smaller
// stride) otherwise, so any strides work, transposed operands included. Edges are bounds-checked.
// Batched products run over blockIdx.z.
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/cuda_api.h"

namespace nnk {
namespace cuda {
namespace {

constexpr int BM = 128, BN = 128, BK = 8, THREADS = 256;
constexpr int kRow = BM + 4;  // padded shared-memory row (floats); keeps float4 alignment

// How a thread maps its 4 elements of a 128 x 8 (A) or 8 x 128 (B) slab:
enum Mode : int {
  kVecWide = 0,  // float4 along m (A) / n (B): operand contiguous there
  kVecK = 1,     // float4 along k: operand contiguous along k
  kWide = 2,     // scalar, consecutive threads step along m / n
  kAlongK = 3,   // scalar, consecutive threads step along k
};

// The GEMM (common/gemm_args.h) plus the batch and the load mode of each operand.
struct Params : Gemm<float> {
  int64_t batch, sa, sb, sc;
  int amode, bmode;
};

// Element e (0..3) of thread `tid` in a slab: `wide` indexes m (or n, 0..127), `k` 0..7.
__device__ __forceinline__ void slab_coord(int mode, int tid, int e, int* wide, int* k) {
  switch (mode) {
    case kVecWide:
      *k = tid >> 5;
      *wide = (tid & 31) * 4 + e;
      break;
    case kVecK:
      *wide = tid >> 1;
      *k = (tid & 1) * 4 + e;
      break;
    case kWide: {
      const int idx = tid + e * THREADS;
      *wide = idx & 127;
      *k = idx >> 7;
      break;
    }
    default: {
      const int idx = tid + e * THREADS;
      *k = idx & 7;
      *wide = idx >> 3;
      break;
    }
  }
}

// Loads this thread's 4 elements of the slab at (w0, k0) of an operand whose element (w, k) is
// at base[w*ws + k*ks], with W rows along `wide` and K along k; zero outside.
__device__ __forceinline__ void load_slab(int mode, const float* base, int64_t ws, int64_t ks,
                                          int64_t W, int64_t K, int64_t w0, int64_t k0, int tid,
                                          float r[4]) {
  int w, k;
  slab_coord(mode, tid, 0, &w, &k);
  const int64_t gw = w0 + w, gk = k0 + k;
  if (mode == kVecWide && gk < K && gw + 3 < W) {
    const float4 v = *reinterpret_cast<const float4*>(base + gw * ws + gk * ks);
    r[0] = v.x;
    r[1] = v.y;
    r[2] = v.z;
    r[3] = v.w;
    return;
  }
  if (mode == kVecK && gw < W && gk + 3 < K) {
    const float4 v = *reinterpret_cast<const float4*>(base + gw * ws + gk * ks);
    r[0] = v.x;
    r[1] = v.y;
    r[2] = v.z;
    r[3] = v.w;
    return;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    slab_coord(mode, tid, e, &w, &k);
    const int64_t ew = w0 + w, ek = k0 + k;
    r[e] = (ew < W && ek < K) ? base[ew * ws + ek * ks] : 0.f;
  }
}

__device__ __forceinline__ void store_slab(int mode, float (*s)[kRow], int tid, const float r[4]) {
  if (mode == kVecWide) {  // 4 consecutive elements of one row: one float4
    int w, k;
    slab_coord(mode, tid, 0, &w, &k);
    *reinterpret_cast<float4*>(&s[k][w]) = make_float4(r[0], r[1], r[2], r[3]);
    return;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    int w, k;
    slab_coord(mode, tid, e, &w, &k);
    s[k][w] = r[e];
  }
}

__global__ void __launch_bounds__(THREADS) sgemm_128x128x8(Params p) {
  static_assert(BN == BM, "one padded row length serves both slabs");
  __shared__ __align__(16) float As[2][BK][kRow];
  __shared__ __align__(16) float Bs[2][BK][kRow];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  const int64_t ntiles = (p.N + BN - 1) / BN;

  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z)
    for (int64_t nt = blockIdx.y; nt < ntiles; nt += gridDim.y) {
      const int64_t n0 = nt * BN;
      const float* A = p.A + b * p.sa;
      const float* B = p.B + b * p.sb;
      float* C = p.C + b * p.sc;
      float acc[8][8];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

      float ra[4], rb[4];
      // A slab: wide = m (stride rsa), k (stride csa). B slab: wide = n (stride csb), k (stride
      // rsb).
      load_slab(p.amode, A, p.rsa, p.csa, p.M, p.K, m0, 0, tid, ra);
      load_slab(p.bmode, B, p.csb, p.rsb, p.N, p.K, n0, 0, tid, rb);
      store_slab(p.amode, As[0], tid, ra);
      store_slab(p.bmode, Bs[0], tid, rb);
      __syncthreads();

      int cur = 0;
      for (int64_t k0 = 0; k0 < p.K; k0 += BK) {
        const bool next = k0 + BK < p.K;
        if (next) {
          load_slab(p.amode, A, p.rsa, p.csa, p.M, p.K, m0, k0 + BK, tid, ra);
          load_slab(p.bmode, B, p.csb, p.rsb, p.N, p.K, n0, k0 + BK, tid, rb);
        }
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
          const float4 a0 = *reinterpret_cast<const float4*>(&As[cur][kk][ty * 4]);
          const float4 a1 = *reinterpret_cast<const float4*>(&As[cur][kk][64 + ty * 4]);
          const float4 b0 = *reinterpret_cast<const float4*>(&Bs[cur][kk][tx * 4]);
          const float4 b1 = *reinterpret_cast<const float4*>(&Bs[cur][kk][64 + tx * 4]);
          const float af[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
          const float bf[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
          for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(af[i], bf[j], acc[i][j]);
        }
        if (next) {
          store_slab(p.amode, As[cur ^ 1], tid, ra);
          store_slab(p.bmode, Bs[cur ^ 1], tid, rb);
        }
        __syncthreads();
        cur ^= 1;
      }

    // Epilogue: C = alpha * acc + beta * C + biases, float4 stores where C allows.
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int64_t m = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
        if (m >= p.M) continue;
        const float bm = p.bias_m ? p.bias_m[m] : 0.f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t n = n0 + h * 64 + tx * 4;
          float* c = C + m * p.rsc + n * p.csc;
          float v[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            v[e] = p.alpha * acc[i][h * 4 + e] + bm;
            if (p.bias_n && n + e < p.N) v[e] += p.bias_n[n + e];
          }
          const bool vec = p.csc == 1 && n + 3 < p.N && (reinterpret_cast<uintptr_t>(c) & 15) == 0;
          if (vec) {
            if (p.beta != 0.f) {
              const float4 old = *reinterpret_cast<const float4*>(c);
              v[0] += p.beta * old.x;
              v[1] += p.beta * old.y;
              v[2] += p.beta * old.z;
              v[3] += p.beta * old.w;
            }
            *reinterpret_cast<float4*>(c) = make_float4(v[0], v[1], v[2], v[3]);
          } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              if (n + e >= p.N) break;
              float* ce = c + e * p.csc;
              *ce = p.beta != 0.f ? v[e] + p.beta * *ce : v[e];
            }
          }
        }
      }
    }
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// Picks the slab mode of an operand with element (w, k) at base[w*ws + k*ks], batch stride bs.
int pick_mode(const float* base, int64_t ws, int64_t ks, int64_t bs) {
  const bool ok4 = aligned16(base) && bs % 4 == 0;
  if (ws == 1 && ks % 4 == 0 && ok4) return kVecWide;
  if (ks == 1 && ws % 4 == 0 && ok4) return kVecK;
  const int64_t aw = ws < 0 ? -ws : ws, ak = ks < 0 ? -ks : ks;
  return aw <= ak ? kWide : kAlongK;
}

}  // namespace

void sgemm(const Gemm<float>& g, int64_t batch, int64_t sa, int64_t sb, int64_t sc, int device,
           void* stream) {
  if (g.M <= 0 || g.N <= 0 || batch <= 0) return;
  Params p;
  static_cast<Gemm<float>&>(p) = g;
  if (g.alpha == 0.f) p.K = 0;  // alpha == 0: A and B are not read (BLAS semantics)
  p.batch = batch;
  p.sa = sa;
  p.sb = sb;
  p.sc = sc;
  p.amode = pick_mode(g.A, g.rsa, g.csa, sa);
  p.bmode = pick_mode(g.B, g.csb, g.rsb, sb);

  const int64_t ntiles = (g.N + BN - 1) / BN;
  const dim3 grid(ceil_div_u(g.M, BM), static_cast<unsigned>(ntiles < 65535 ? ntiles : 65535),
                  static_cast<unsigned>(batch < 65535 ? batch : 65535));
  DeviceGuard guard(device);
  sgemm_128x128x8<<<grid, THREADS, 0, static_cast<cudaStream_t>(stream)>>>(p);
  check(cudaGetLastError(), "sgemm launch");
}

}  // namespace cuda
}  // namespace nnk
