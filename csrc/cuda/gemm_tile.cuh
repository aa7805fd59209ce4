// The one GEMM on the GPU, as a kernel template over its operands (the CPU GEMM's pack_b_fn, for
// CUDA): C (M x N) = A (M x K) . B (K x N) tile by tile, for `items` independent products (batch
// items, conv images x groups, split-K slices). gemm.cu instantiates it with strided operands;
// conv2d.cu with implicit im2col operands.
//
// Block tile 128 x 128 x 8, 256 threads as a 16 x 16 grid, each thread an 8 x 8 register tile
// (rows ty*4+{0..3} and 64+ty*4+{0..3}, likewise columns, so shared-memory reads are float4 and
// conflict-free). Shared rows are padded to 132 floats so the transposing slab stores do not
// collide in one bank. Tiles are double-buffered in shared memory: the next k-slab is fetched into
// registers while the current one is multiplied. M tiles run over blockIdx.x, N tiles over
// blockIdx.y and items over blockIdx.z (both grid-stride, no size limit).
//
// An operand provider has `int mode` (how its 4 elements per thread map onto the slab, below) and
//   __device__ void load(int64_t item, int64_t w0, int64_t k0, int64_t kend, int tid,
//                        float r[4]) const;
// filling this thread's elements of the slab at (w0 along M or N, k0 along K) with zeros past the
// operand's edge and at k >= kend. The epilogue is called once per tile with the accumulators:
//   __device__ void operator()(int64_t item, int64_t m0, int64_t n0, const float acc[8][8],
//                              int tx, int ty) const;
// where acc[i][j] is C(m0 + tile_row(i, ty), n0 + tile_row(j, tx)).
#pragma once
#include <cstdint>

namespace nnk {
namespace cuda {
namespace tile {

constexpr int BM = 128, BN = 128, BK = 8, THREADS = 256;
constexpr int kRow = BM + 4;  // padded shared-memory row (floats); keeps float4 alignment
static_assert(BN == BM, "one padded row length serves both slabs");

// How a thread maps its 4 elements of a 128 x 8 (A) or 8 x 128 (B) slab:
enum Mode : int {
  kVecWide = 0,  // float4 along m (A) / n (B): operand contiguous there
  kVecK = 1,     // float4 along k: operand contiguous along k
  kWide = 2,     // scalar, consecutive threads step along m / n
  kAlongK = 3,   // scalar, consecutive threads step along k
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

__device__ __forceinline__ int tile_row(int i, int t) {
  return i < 4 ? t * 4 + i : 64 + t * 4 + i - 4;
}

// Loads this thread's 4 elements of the slab at (w0, k0) of an operand whose element (w, k) is
// at base[w*ws + k*ks], with W rows along `wide` and K along k; zero outside.
__device__ __forceinline__ void load_slab(int mode, const float* base, int64_t ws, int64_t ks,
                                          int64_t W, int64_t K, int64_t w0, int64_t k0, int tid,
                                          float r[4]) {
  int w, k;
  slab_coord(mode, tid, 0, &w, &k);
  const int64_t gw = w0 + w, gk = k0 + k;
  if ((mode == kVecWide && gk < K && gw + 3 < W) || (mode == kVecK && gw < W && gk + 3 < K)) {
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

// Offset of batch item `item` when items form an (outer x inner) grid: (item / inner) * outer
// stride + (item % inner) * inner stride (inner == 1: a plain batch stride).
struct ItemOffset {
  int64_t inner = 1, s_outer = 0, s_inner = 0;
  __device__ __forceinline__ int64_t operator()(int64_t item) const {
    return inner == 1 ? item * s_outer : (item / inner) * s_outer + (item % inner) * s_inner;
  }
};

// A plain strided operand: element (w, k) of item b at base[off(b) + w*ws + k*ks].
struct Strided {
  const float* base;
  int64_t ws, ks, W;
  ItemOffset off;
  int mode;
  __device__ __forceinline__ void load(int64_t item, int64_t w0, int64_t k0, int64_t kend, int tid,
                                       float r[4]) const {
    load_slab(mode, base + off(item), ws, ks, W, kend, w0, k0, tid, r);
  }
};

// An implicit operand: element (w, k) of item b is f(b, w, k), the functor returning 0 past the
// operand's edge along w; zero at k >= kend. For operands that exist only as index math (conv2d).
template <class F>
struct Implicit {
  F f;
  int mode;
  __device__ __forceinline__ void load(int64_t item, int64_t w0, int64_t k0, int64_t kend, int tid,
                                       float r[4]) const {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      int w, k;
      slab_coord(mode, tid, e, &w, &k);
      const int64_t kk = k0 + k;
      r[e] = kk < kend ? f(item, w0 + w, kk) : 0.f;
    }
  }
};

// The accumulators of one tile: C(m0..m0+127, n0..n0+127) = sum over k in [kb, ke).
template <class AOp, class BOp>
__device__ __forceinline__ void mainloop(const AOp& a, const BOp& b, int64_t item, int64_t m0,
                                         int64_t n0, int64_t kb, int64_t ke, float acc[8][8],
                                         float (*As)[BK][kRow], float (*Bs)[BK][kRow]) {
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

  float ra[4], rb[4];
  a.load(item, m0, kb, ke, tid, ra);
  b.load(item, n0, kb, ke, tid, rb);
  store_slab(a.mode, As[0], tid, ra);
  store_slab(b.mode, Bs[0], tid, rb);
  __syncthreads();

  int cur = 0;
  for (int64_t k0 = kb; k0 < ke; k0 += BK) {
    const bool next = k0 + BK < ke;
    if (next) {
      a.load(item, m0, k0 + BK, ke, tid, ra);
      b.load(item, n0, k0 + BK, ke, tid, rb);
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
      store_slab(a.mode, As[cur ^ 1], tid, ra);
      store_slab(b.mode, Bs[cur ^ 1], tid, rb);
    }
    __syncthreads();  // the slab just read is overwritten next; also guards the next tile
    cur ^= 1;
  }
}

// One GEMM problem: sizes, the item count, the split of K per item, the operands, the epilogue.
// With ksplit > 1, item = outer * ksplit + slice and slice s covers K range [s*chunk, (s+1)*chunk)
// (chunk a multiple of BK): the epilogue must then accumulate (atomically).
template <class AOp, class BOp, class Epi>
struct Problem {
  int64_t M, N, K, items, ksplit;
  AOp a;
  BOp b;
  Epi epi;
};

template <class AOp, class BOp, class Epi>
__global__ void __launch_bounds__(THREADS, 1) gemm_kernel(Problem<AOp, BOp, Epi> pr) {
  __shared__ __align__(16) float As[2][BK][kRow];
  __shared__ __align__(16) float Bs[2][BK][kRow];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  const int64_t ntiles = (pr.N + BN - 1) / BN;
  const int64_t chunk = ((pr.K + pr.ksplit - 1) / pr.ksplit + BK - 1) / BK * BK;
  for (int64_t item = blockIdx.z; item < pr.items; item += gridDim.z)
    for (int64_t nt = blockIdx.y; nt < ntiles; nt += gridDim.y) {
      const int64_t slice = item % pr.ksplit;
      const int64_t kb = slice * chunk, ke = kb + chunk < pr.K ? kb + chunk : pr.K;
      float acc[8][8];
      mainloop(pr.a, pr.b, item, m0, nt * BN, kb, ke > kb ? ke : kb, acc, As, Bs);
      pr.epi(item, m0, nt * BN, acc, tx, ty);
    }
}

// Grid for a problem: M tiles x N tiles (capped, grid-stride) x items (capped, grid-stride).
template <class P>
dim3 grid_for(const P& pr) {
  const int64_t mt = (pr.M + BM - 1) / BM, nt = (pr.N + BN - 1) / BN;
  return dim3(static_cast<unsigned>(mt), static_cast<unsigned>(nt < 65535 ? nt : 65535),
              static_cast<unsigned>(pr.items < 65535 ? pr.items : 65535));
}

}  // namespace tile
}  // namespace cuda
}  // namespace nnk
