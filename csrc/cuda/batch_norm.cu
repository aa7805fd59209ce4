// Batch normalization on CUDA: fp32 data, float64 partial sums, the math of the CPU kernels
// (cpu/batch_norm.cpp): shifted single-pass statistics (shift = the channel's first element),
// y = (x - mean) * scale + shift, and the backward as one reduction plus one elementwise pass.
//
// Two kernels per training pass. The reduction kernel leaves per-(channel, block) partial sums in a
// workspace (C x kBatchNormParts x 2 doubles, from torch's allocator); the elementwise kernel
// starts by adding its channel's partials and finishing them (mean / invstd and the running
// statistics, or dw / db and the coefficients of dx; block 0 of each channel writes the
// per-channel outputs), then normalises. No separate finish launch; the second read of the input
// mostly hits L2 for activations up to L2's size.
//
// Views are (N, C, S) (View3, normalised as on the CPU) in one of two layouts, the same for
// every operand of a call (the bindings check it; Python makes other inputs contiguous):
//   rows    ss == 1 (NCHW, (N, C, L)): grid (C, P). A channel's N rows are cut into pieces of at
//           most kPiece values; block p takes a range of pieces, its threads walk each piece
//           (consecutive threads, consecutive addresses). Sums: float per thread and piece, then
//           float64; warp shuffles and shared memory for the block.
//   pixels  sc == 1 (channels_last, (N, C)): grid (ceil(C / 32), P), block 32 channels x 8 pixel
//           lanes: a warp reads 32 consecutive channels of one pixel. The 8 lanes are added
//           through shared memory.
#include <cstdint>

#include "common/tensor.h"
#include "cuda/common.cuh"
#include "cuda/cuda_api.h"

namespace nnk {
namespace cuda {
namespace {

using View = View3<const float>;
using OutView = View3<float>;

constexpr int kRowThreads = 256;
constexpr int64_t kPiece = int64_t(kRowThreads) * 32;  // 32 values per thread per row piece
constexpr int kFlush = 256;                            // pixel lanes: float sums -> float64

// Per-channel coefficients of the elementwise kernels: out = (x - m) * k1 + k0 (affine), or
// out = (dy - k0 - (x - m) * k1) * k2 (gradient).
struct Coef {
  float m, k0, k1, k2;
};

// Pieces of one channel's rows: item i is piece i % K of row i / K.
struct Pieces {
  int64_t K, len;
  __host__ __device__ explicit Pieces(int64_t S) {
    len = S < kPiece ? S : kPiece;
    K = len > 0 ? (S + len - 1) / len : 1;
  }
};

__device__ inline double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// (a, b) summed over the block (blockDim.x == kRowThreads); the totals land in thread 0.
__device__ inline void block_sum2(double& a, double& b) {
  __shared__ double sa[kRowThreads / 32], sb[kRowThreads / 32];
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = warp_sum(lane < kRowThreads / 32 ? sa[lane] : 0.0);
    b = warp_sum(lane < kRowThreads / 32 ? sb[lane] : 0.0);
  }
}

// The sums of one element: statistics a += d, q += d * d with d = x - ref (ref: the channel's
// first element); gradient sums a += dy, q += dy * (x - ref) (ref: the mean).
template <bool kGrad>
__device__ inline void accumulate(float xv, float g, float ref, float& a, float& q) {
  if (kGrad) {
    a += g;
    q += g * (xv - ref);
  } else {
    const float d = xv - ref;
    a += d;
    q += d * d;
  }
}

template <bool kGrad>
__device__ inline float channel_ref(const View& x, const float* ref, int64_t c) {
  if (kGrad) return ref[c];
  return x.N * x.S > 0 ? x.p[c * x.sc] : 0.f;
}

// Offset of pixel q = n * S + s: packed views (sn == S * ss) need no division.
template <bool kPacked>
__device__ inline int64_t pixel_offset(int64_t q, int64_t S, int64_t sn, int64_t ss) {
  if (kPacked) return q * ss;
  const int64_t n = q / S;
  return n * sn + (q - n * S) * ss;
}

// ------------------------------------------------------------------------------- reductions

template <bool kGrad>
__global__ void __launch_bounds__(kRowThreads)
    rows_sums(View x, View dy, const float* ref, int parts, double* ws) {
  const int64_t c = blockIdx.x;
  const int p = blockIdx.y;
  const Pieces pc(x.S);
  const int64_t items = x.N * pc.K, b = items * p / parts, e = items * (p + 1) / parts;
  const float r = channel_ref<kGrad>(x, ref, c);
  double A = 0, Q = 0;
  for (int64_t it = b; it < e; ++it) {
    const int64_t n = it / pc.K, s0 = (it - n * pc.K) * pc.len;
    const int64_t s1 = s0 + pc.len < x.S ? s0 + pc.len : x.S;
    const float* xr = x.p + n * x.sn + c * x.sc;
    const float* gr = kGrad ? dy.p + n * dy.sn + c * dy.sc : nullptr;
    float a = 0.f, q = 0.f;
    for (int64_t s = s0 + threadIdx.x; s < s1; s += kRowThreads)
      accumulate<kGrad>(xr[s], kGrad ? gr[s] : 0.f, r, a, q);
    A += a;
    Q += q;
  }
  block_sum2(A, Q);
  if (threadIdx.x == 0) {
    ws[(c * parts + p) * 2] = A;
    ws[(c * parts + p) * 2 + 1] = Q;
  }
}

template <bool kGrad, bool kPacked>
__global__ void pixels_sums(View x, View dy, const float* ref, int parts, double* ws) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * 32 + tx;
  const int p = blockIdx.y;
  const int64_t P = x.N * x.S, b = P * p / parts, e = P * (p + 1) / parts;
  double A = 0, Q = 0;
  if (c < x.C) {
    const float r = channel_ref<kGrad>(x, ref, c);
    float a = 0.f, q = 0.f;
    int k = 0;
    for (int64_t i = b + ty; i < e; i += 8) {
      const float xv = x.p[pixel_offset<kPacked>(i, x.S, x.sn, x.ss) + c];
      const float g = kGrad ? dy.p[pixel_offset<kPacked>(i, x.S, dy.sn, dy.ss) + c] : 0.f;
      accumulate<kGrad>(xv, g, r, a, q);
      if (++k == kFlush) {
        A += a;
        Q += q;
        a = q = 0.f;
        k = 0;
      }
    }
    A += a;
    Q += q;
  }
  __shared__ double sa[8][33], sb[8][33];
  sa[ty][tx] = A;
  sb[ty][tx] = Q;
  __syncthreads();
  if (ty == 0 && c < x.C) {
    double ta = 0, tb = 0;
#pragma unroll
    for (int y = 0; y < 8; ++y) {
      ta += sa[y][tx];
      tb += sb[y][tx];
    }
    ws[(c * parts + p) * 2] = ta;
    ws[(c * parts + p) * 2 + 1] = tb;
  }
}

// Totals of channel c from its `parts` partials, in partial order.
__device__ inline void channel_totals(const double* ws, int64_t c, int parts, double* a,
                                      double* b) {
  double ta = 0, tb = 0;
  for (int i = 0; i < parts; ++i) {
    ta += ws[(c * parts + i) * 2];
    tb += ws[(c * parts + i) * 2 + 1];
  }
  *a = ta;
  *b = tb;
}

// One thread per channel: fin(c, totals) for reductions that end in per-channel outputs only.
template <class Fin>
__global__ void finish_channels(int64_t C, int parts, const double* ws, Fin fin) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double a, b;
  channel_totals(ws, c, parts, &a, &b);
  fin(c, a, b);
}

// ------------------------------------------------------------- per-channel coefficient makers
// coefs(c, a, b, write) -> Coef from the channel's totals (a, b) of the reduction (ignored by the
// makers that read given arrays); write: this block stores the channel's per-channel outputs.

// mean and m2 = sum (x - mean)^2 from sums of (x - shift) over count values (as the CPU).
__device__ inline void finish_stats(double shift, double s1, double s2, double count, double* mean,
                                    double* m2) {
  const double d = s1 / count;
  *mean = shift + d;
  *m2 = s2 - s1 * d;
  if (*m2 < 0) *m2 = 0;
}

struct TrainForwardCoefs {
  View x;
  double count, eps, momentum;
  const float *w, *b;
  float *save_mean, *save_invstd, *running_mean, *running_var;
  __device__ Coef operator()(int64_t c, double s1, double s2, bool write) const {
    double mu, m2;
    finish_stats(double(channel_ref<false>(x, nullptr, c)), s1, s2, count, &mu, &m2);
    const double invstd = rsqrt(m2 / count + eps);
    if (write) {
      save_mean[c] = float(mu);
      save_invstd[c] = float(invstd);
      if (running_mean)
        running_mean[c] = float((1 - momentum) * double(running_mean[c]) + momentum * mu);
      if (running_var)
        running_var[c] = float((1 - momentum) * double(running_var[c]) +
                               momentum * (count > 1 ? m2 / (count - 1) : m2 / count));
    }
    return {float(mu), b ? b[c] : 0.f, float(invstd * (w ? double(w[c]) : 1.0)), 0.f};
  }
};

struct TrainBackwardCoefs {
  double count;
  const float *mean, *invstd, *w;
  float *dw, *db;
  __device__ Coef operator()(int64_t c, double sdy, double sdyx, bool write) const {
    const double is = double(invstd[c]);
    if (write && dw) dw[c] = float(sdyx * is);
    if (write && db) db[c] = float(sdy);
    return {mean[c], float(sdy / count), float(sdyx / count * is * is),
            float(is * (w ? double(w[c]) : 1.0))};
  }
};

struct AffineCoefs {  // y = (x - center) * scale + shift
  const float *center, *scale, *shift;
  __device__ Coef operator()(int64_t c, double, double, bool) const {
    return {center ? center[c] : 0.f, shift[c], scale[c], 0.f};
  }
};

struct GradApplyCoefs {  // dx = (dy - mean_dy - (x - mean) * invstd * mean_dy_xhat) * invstd * w
  const float *mean, *invstd, *w, *mean_dy, *mean_dy_xhat;
  __device__ Coef operator()(int64_t c, double, double, bool) const {
    const double is = double(invstd[c]);
    return {mean[c], mean_dy[c], float(is * double(mean_dy_xhat[c])),
            float(is * (w ? double(w[c]) : 1.0))};
  }
};

template <bool kGrad>
__device__ inline float elementwise(const Coef& k, float xv, float g) {
  return kGrad ? (g - k.k0 - (xv - k.m) * k.k1) * k.k2 : (xv - k.m) * k.k1 + k.k0;
}

// ----------------------------------------------------------------------- elementwise kernels
// ws null: the coefficient maker reads given arrays (no partials to add).

template <class Coefs, bool kGrad>
__global__ void __launch_bounds__(kRowThreads)
    rows_apply(View x, View dy, OutView out, Coefs coefs, int parts, const double* ws) {
  const int64_t c = blockIdx.x;
  __shared__ Coef shared;
  if (threadIdx.x < 32) {  // warp 0 adds the channel's partials and finishes them
    double a = 0, b = 0;
    if (ws)
      for (int i = threadIdx.x; i < parts; i += 32) {
        a += ws[(c * parts + i) * 2];
        b += ws[(c * parts + i) * 2 + 1];
      }
    a = warp_sum(a);
    b = warp_sum(b);
    if (threadIdx.x == 0) shared = coefs(c, a, b, blockIdx.y == 0);
  }
  __syncthreads();
  const Coef k = shared;
  const Pieces pc(x.S);
  const int64_t items = x.N * pc.K;
  for (int64_t it = blockIdx.y; it < items; it += gridDim.y) {
    const int64_t n = it / pc.K, s0 = (it - n * pc.K) * pc.len;
    const int64_t s1 = s0 + pc.len < x.S ? s0 + pc.len : x.S;
    const float* xr = x.p + n * x.sn + c * x.sc;
    const float* gr = kGrad ? dy.p + n * dy.sn + c * dy.sc : nullptr;
    float* o = out.p + n * out.sn + c * out.sc;
    for (int64_t s = s0 + threadIdx.x; s < s1; s += kRowThreads)
      o[s] = elementwise<kGrad>(k, xr[s], kGrad ? gr[s] : 0.f);
  }
}

template <class Coefs, bool kGrad, bool kPacked>
__global__ void pixels_apply(View x, View dy, OutView out, Coefs coefs, int parts,
                             const double* ws) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * 32 + tx;
  __shared__ Coef shared[32];
  if (ty == 0 && c < x.C) {
    double a = 0, b = 0;
    if (ws) channel_totals(ws, c, parts, &a, &b);
    shared[tx] = coefs(c, a, b, blockIdx.y == 0);
  }
  __syncthreads();
  if (c >= x.C) return;
  const Coef k = shared[tx];
  const int64_t P = x.N * x.S;
  for (int64_t i = int64_t(blockIdx.y) * 8 + ty; i < P; i += int64_t(gridDim.y) * 8) {
    const float xv = x.p[pixel_offset<kPacked>(i, x.S, x.sn, x.ss) + c];
    const float g = kGrad ? dy.p[pixel_offset<kPacked>(i, x.S, dy.sn, dy.ss) + c] : 0.f;
    out.p[pixel_offset<kPacked>(i, x.S, out.sn, out.ss) + c] = elementwise<kGrad>(k, xv, g);
  }
}

// --------------------------------------------------------------------------------- launches

int sms(int device) {
  int n = 0;
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "SM count");
  return n > 0 ? n : 1;
}

int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

template <class V>
bool packed(const V& v) {
  return v.N <= 1 || v.sn == v.S * v.ss;
}

// Whether the call takes the pixel kernels: the bindings guarantee that every view has unit-stride
// rows (ss == 1 or S == 1) or that every view has channels innermost (sc == 1). A view can be both
// (C == 1): the rows kernels only when every operand has unit-stride rows (absent operands: p
// null).
template <class V>
bool unit_rows(const V& v) {
  return v.p == nullptr || v.ss == 1 || v.S == 1;
}
bool pixel_layout(const View& x, const View& dy, const OutView& out) {
  return !(unit_rows(x) && unit_rows(dy) && unit_rows(out));
}

struct Launch {
  int device;
  cudaStream_t stream;
  int sm;
  Launch(int dev, void* s) : device(dev), stream(static_cast<cudaStream_t>(s)), sm(sms(dev)) {}
};

// Partial sums of every channel into ws; returns the number of partials per channel.
template <bool kGrad>
int reduce(const Launch& L, const View& x, const View& dy, const float* ref, double* ws) {
  if (!pixel_layout(x, dy, OutView{})) {
    const int64_t items = x.N * Pieces(x.S).K;
    const int parts = int(
        clamp64(clamp64((4 * L.sm + x.C - 1) / x.C, 1, kBatchNormParts), 1, items > 0 ? items : 1));
    rows_sums<kGrad>
        <<<dim3(unsigned(x.C), unsigned(parts)), kRowThreads, 0, L.stream>>>(x, dy, ref, parts, ws);
    check(cudaGetLastError(), "batch_norm reduction launch");
    return parts;
  }
  const int64_t cb = (x.C + 31) / 32, P = x.N * x.S;
  const int parts = int(
      clamp64(clamp64((4 * L.sm + cb - 1) / cb, 1, kBatchNormParts), 1, P > 8 ? (P + 7) / 8 : 1));
  const dim3 grid{unsigned(cb), unsigned(parts)}, block{32, 8};
  if (packed(x) && (!kGrad || packed(dy)))
    pixels_sums<kGrad, true><<<grid, block, 0, L.stream>>>(x, dy, ref, parts, ws);
  else
    pixels_sums<kGrad, false><<<grid, block, 0, L.stream>>>(x, dy, ref, parts, ws);
  check(cudaGetLastError(), "batch_norm reduction launch");
  return parts;
}

template <bool kGrad, class Coefs>
void apply(const Launch& L, const View& x, const View& dy, const OutView& out, const Coefs& coefs,
           int parts, const double* ws) {
  if (!pixel_layout(x, dy, out)) {
    const int64_t items = x.N * Pieces(x.S).K;
    const int64_t per = clamp64((8 * L.sm + x.C - 1) / x.C, 1, clamp64(items, 1, 65535));
    rows_apply<Coefs, kGrad><<<dim3(unsigned(x.C), unsigned(per)), kRowThreads, 0, L.stream>>>(
        x, dy, out, coefs, parts, ws);
  } else {
    const int64_t cb = (x.C + 31) / 32, P = x.N * x.S;
    const int64_t per = clamp64((8 * L.sm + cb - 1) / cb, 1, clamp64((P + 7) / 8, 1, 65535));
    const dim3 grid{unsigned(cb), unsigned(per)}, block{32, 8};
    if (packed(x) && packed(out) && (!kGrad || packed(dy)))
      pixels_apply<Coefs, kGrad, true><<<grid, block, 0, L.stream>>>(x, dy, out, coefs, parts, ws);
    else
      pixels_apply<Coefs, kGrad, false><<<grid, block, 0, L.stream>>>(x, dy, out, coefs, parts, ws);
  }
  check(cudaGetLastError(), "batch_norm elementwise launch");
}

template <class Fin>
void finish(const Launch& L, int64_t C, int parts, const double* ws, const Fin& fin) {
  finish_channels<<<ceil_div_u(C, 128), 128, 0, L.stream>>>(C, parts, ws, fin);
  check(cudaGetLastError(), "batch_norm finish launch");
}

struct StatsFin {  // mean, m2
  View x;
  double count;
  float *mean, *m2;
  __device__ void operator()(int64_t c, double s1, double s2) const {
    double mu, q;
    finish_stats(double(channel_ref<false>(x, nullptr, c)), s1, s2, count, &mu, &q);
    mean[c] = float(mu);
    m2[c] = float(q);
  }
};

struct GradSumsFin {  // sum_dy, sum_dy_xhat = sum dy * (x - mean) * invstd
  const float* invstd;
  float *sum_dy, *sum_dy_xhat;
  __device__ void operator()(int64_t c, double sdy, double sdyx) const {
    sum_dy[c] = float(sdy);
    sum_dy_xhat[c] = float(sdyx * double(invstd[c]));
  }
};

struct TrainBackwardFin {  // dw, db only (no input gradient)
  TrainBackwardCoefs coefs;
  __device__ void operator()(int64_t c, double sdy, double sdyx) const {
    coefs(c, sdy, sdyx, true);
  }
};

}  // namespace

void batch_norm_forward_train(View x, OutView y, const float* w, const float* b, double eps,
                              double momentum, float* save_mean, float* save_invstd,
                              float* running_mean, float* running_var, double* ws, int device,
                              void* stream) {
  x = normalised(x);
  y = normalised(y);
  if (x.C == 0) return;
  DeviceGuard guard(device);
  const Launch L(device, stream);
  const int parts = reduce<false>(L, x, View{}, nullptr, ws);
  const TrainForwardCoefs coefs{x, double(x.N * x.S), eps,         momentum,     w,
                                b, save_mean,         save_invstd, running_mean, running_var};
  apply<false>(L, x, View{}, y, coefs, parts, ws);
}

void batch_norm_stats(View x, float* mean, float* m2, double* ws, int device, void* stream) {
  x = normalised(x);
  if (x.C == 0) return;
  DeviceGuard guard(device);
  const Launch L(device, stream);
  const int parts = reduce<false>(L, x, View{}, nullptr, ws);
  finish(L, x.C, parts, ws, StatsFin{x, double(x.N * x.S), mean, m2});
}

void batch_norm_apply(View x, OutView y, const float* center, const float* scale,
                      const float* shift, int device, void* stream) {
  x = normalised(x);
  y = normalised(y);
  if (x.C == 0 || x.N * x.S == 0) return;
  DeviceGuard guard(device);
  apply<false>(Launch(device, stream), x, View{}, y, AffineCoefs{center, scale, shift}, 0, nullptr);
}

void batch_norm_backward_reduce(View dy, View x, const float* mean, const float* invstd,
                                float* sum_dy, float* sum_dy_xhat, double* ws, int device,
                                void* stream) {
  dy = normalised(dy);
  x = normalised(x);
  if (x.C == 0) return;
  DeviceGuard guard(device);
  const Launch L(device, stream);
  const int parts = reduce<true>(L, x, dy, mean, ws);
  finish(L, x.C, parts, ws, GradSumsFin{invstd, sum_dy, sum_dy_xhat});
}

void batch_norm_backward_apply(View dy, View x, const float* mean, const float* invstd,
                               const float* w, const float* mean_dy, const float* mean_dy_xhat,
                               OutView dx, int device, void* stream) {
  dy = normalised(dy);
  x = normalised(x);
  dx = normalised(dx);
  if (x.C == 0 || x.N * x.S == 0) return;
  DeviceGuard guard(device);
  apply<true>(Launch(device, stream), x, dy, dx,
              GradApplyCoefs{mean, invstd, w, mean_dy, mean_dy_xhat}, 0, nullptr);
}

void batch_norm_backward_train(View dy, View x, const float* mean, const float* invstd,
                               const float* w, OutView dx, float* dw, float* db, double* ws,
                               int device, void* stream) {
  dy = normalised(dy);
  x = normalised(x);
  dx = normalised(dx);
  if (x.C == 0) return;
  DeviceGuard guard(device);
  const Launch L(device, stream);
  const int parts = reduce<true>(L, x, dy, mean, ws);
  const TrainBackwardCoefs coefs{double(x.N * x.S), mean, invstd, w, dw, db};
  if (dx.p && x.N * x.S > 0)
    apply<true>(L, x, dy, dx, coefs, parts, ws);
  else
    finish(L, x.C, parts, ws, TrainBackwardFin{coefs});
}

}  // namespace cuda
}  // namespace nnk
