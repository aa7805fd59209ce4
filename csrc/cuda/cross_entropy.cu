// Fused softmax-cross-entropy on CUDA (the math of cpu/cross_entropy.cpp): G threads own a row of
// logits (a warp when C is small, 512 threads otherwise). Pass 1: each thread keeps an online
// (max, sum exp(x - max)) over its strided share of the row, plus the linear sums the options
// need; warp shuffles and then shared memory join them. Pass 2 (only when a gradient is wanted)
// re-reads the row (L2-resident: one row is at most a few hundred KB) and writes
//   grad = grad_scale * (p (A) - w (K0 + K1 q) - [c = t] (1 - eps) w_t),   p = exp(x - lse),
// so the backward only scales it. Storage float32 / float16 / bfloat16, math in float32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "common/cross_entropy_args.h"
#include "cuda/common.cuh"
#include "cuda/cuda_api.h"

namespace nnk {
namespace cuda {
namespace {

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <class T>
__device__ __forceinline__ T cvt(float v);
template <>
__device__ __forceinline__ float cvt<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half cvt<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 cvt<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// What a thread (then the row) gathers: online max m and sum s = sum exp(x - m); wx = sum w (x -
// shift), wq = sum w q, wqx = sum w q (x - shift); xt = x[target] (from the thread that read it:
// pass 2 may overwrite x when the gradient is written in place).
struct Part {
  float m, s, wx, wq, wqx, xt;
};

// (m, s) += x. exp(x - x) is 1, or NaN for x = +inf: a row holding +inf gives NaN, as in torch.
__device__ __forceinline__ void online_add(Part& p, float x) {
  if (x > p.m) {
    p.s = p.s * expf(p.m - x) + expf(x - x);
    p.m = x;
  } else {
    p.s += expf(x - p.m);
  }
}

__device__ __forceinline__ Part join(Part a, const Part& b) {
  const float m = fmaxf(a.m, b.m);
  a.s = a.s * expf(a.m - m) + b.s * expf(b.m - m);
  a.m = m;
  a.wx += b.wx, a.wq += b.wq, a.wqx += b.wqx, a.xt += b.xt;
  return a;
}

__device__ __forceinline__ Part shfl_xor(const Part& p, int mask) {
  return {__shfl_xor_sync(0xffffffffu, p.m, mask),   __shfl_xor_sync(0xffffffffu, p.s, mask),
          __shfl_xor_sync(0xffffffffu, p.wx, mask),  __shfl_xor_sync(0xffffffffu, p.wq, mask),
          __shfl_xor_sync(0xffffffffu, p.wqx, mask), __shfl_xor_sync(0xffffffffu, p.xt, mask)};
}

// The row total, in every thread of the G threads (threadIdx.x) that own row threadIdx.y.
template <int G, int R>
__device__ Part row_total(Part p) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) p = join(p, shfl_xor(p, mask));
  if constexpr (G > 32) {
    constexpr int kWarps = G / 32;
    __shared__ Part warp_parts[R][kWarps];
    __shared__ Part total[R];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_parts[threadIdx.y][warp] = p;
    __syncthreads();
    if (warp == 0) {
      p = lane < kWarps ? warp_parts[threadIdx.y][lane] : Part{-FLT_MAX, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int mask = 16; mask > 0; mask >>= 1) p = join(p, shfl_xor(p, mask));
      if (lane == 0) total[threadIdx.y] = p;
    }
    __syncthreads();
    p = total[threadIdx.y];
  }
  return p;
}

template <class T, int G, int R>
__global__ void __launch_bounds__(G* R) cross_entropy_rows(CrossEntropyArgs a) {
  const int64_t row = int64_t(blockIdx.x) * R + threadIdx.y;
  // Rows past the end still take part in the block's barriers (row_total), then do nothing.
  const bool live = row < a.rows;
  const int64_t C = a.C;
  const T* x = static_cast<const T*>(a.x) + (live ? row : 0) * a.ldx;
  const T* w = static_cast<const T*>(a.weight);
  const T* q = a.soft ? static_cast<const T*>(a.soft) + (live ? row : 0) * a.ldt : nullptr;
  T* g = a.grad && live ? static_cast<T*>(a.grad) + row * a.ldg : nullptr;
  const float eps = a.smoothing;
  const bool smooth = eps > 0.f;

  int64_t t = -1;
  bool ignored = false, bad = false;
  if (a.target && live) {
    t = a.target[row];
    ignored = t == a.ignore_index;
    bad = !ignored && (t < 0 || t >= C);  // the Python layer rejects these first
  }
  const float x0 = live && C > 0 ? ld(x) : 0.f;
  const float shift = isfinite(x0) ? x0 : 0.f;
  Part p{-FLT_MAX, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (live && !ignored && !bad) {
    for (int64_t c = threadIdx.x; c < C; c += G) {
      const float v = ld(x + c);
      online_add(p, v);
      if (c == t) p.xt = v;
      const float wc = w ? ld(w + c) : 1.f;
      if (smooth) p.wx += wc * (v - shift);
      if (q) {
        const float wq = wc * ld(q + c);
        p.wq += wq;
        p.wqx += wq * (v - shift);
      }
    }
  }
  p = row_total<G, R>(p);
  if (!live) return;

  float wsum = float(C);  // sum of the class weights
  if (w && smooth) {
    // Small next to the row itself: one extra read of C weights (cached across rows).
    float part = 0.f;
    for (int64_t c = threadIdx.x; c < C; c += G) part += ld(w + c);
    for (int mask = 16; mask > 0; mask >>= 1) part += __shfl_xor_sync(0xffffffffu, part, mask);
    if constexpr (G > 32) {
      __shared__ float warp_w[R][G / 32];
      if (threadIdx.x % 32 == 0) warp_w[threadIdx.y][threadIdx.x / 32] = part;
      __syncthreads();
      part = 0.f;
      for (int i = 0; i < G / 32; ++i) part += warp_w[threadIdx.y][i];
    }
    wsum = part;
  }
  const float logs = logf(p.s), lse = p.m + logs;
  const float gs = a.grad_scale_divisor ? a.grad_scale / *a.grad_scale_divisor : a.grad_scale;
  const float invC = 1.f / float(C);
  float A = 0.f, K0 = 0.f, K1 = 0.f, dt = 0.f, loss;
  if (ignored) {
    loss = 0.f;
  } else if (bad) {
    loss = NAN;
    A = NAN;
  } else if (a.target) {
    const float wt = w ? ld(w + t) : 1.f;
    loss = (1.f - eps) * wt * (lse - p.xt);
    if (smooth) loss += eps * invC * (wsum * (lse - shift) - p.wx);
    A = gs * ((1.f - eps) * wt + eps * wsum * invC);
    K0 = gs * eps * invC;
    dt = gs * (1.f - eps) * wt;
  } else {
    const float swq = (1.f - eps) * p.wq + eps * invC * wsum;
    loss = swq * (lse - shift) - ((1.f - eps) * p.wqx + eps * invC * p.wx);
    A = gs * swq;
    K0 = gs * eps * invC;
    K1 = gs * (1.f - eps);
  }
  if (threadIdx.x == 0) static_cast<T*>(a.loss)[row] = cvt<T>(loss);
  if (!g) return;
  for (int64_t c = threadIdx.x; c < C; c += G) {
    float v = 0.f;
    if (!ignored) {
      const float wc = w && (smooth || q) ? ld(w + c) : 1.f;
      v = expf((ld(x + c) - p.m) - logs) * A - wc * (q ? fmaf(K1, ld(q + c), K0) : K0);
      if (c == t) v -= dt;
    }
    g[c] = cvt<T>(v);
  }
}

template <class T>
void launch(const CrossEntropyArgs& a, cudaStream_t stream) {
  if (a.C <= 1024) {
    constexpr int G = 32, R = 8;  // a warp per row, 8 rows per block
    cross_entropy_rows<T, G, R><<<ceil_div_u(a.rows, R), dim3(G, R), 0, stream>>>(a);
  } else {
    constexpr int G = 512, R = 1;
    cross_entropy_rows<T, G, R><<<ceil_div_u(a.rows, R), dim3(G, R), 0, stream>>>(a);
  }
}

}  // namespace

void cross_entropy_forward(const CrossEntropyArgs& a, int device, void* stream) {
  if (a.rows == 0) return;
  DeviceGuard guard(device);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::f16:
      launch<__half>(a, s);
      break;
    case DType::bf16:
      launch<__nv_bfloat16>(a, s);
      break;
    default:
      launch<float>(a, s);
  }
  check(cudaGetLastError(), "cross_entropy_forward launch");
}

}  // namespace cuda
}  // namespace nnk
