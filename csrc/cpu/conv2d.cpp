// 2-D convolution on the CPU: forward, backward-data and backward-weight (+ bias), on the
// project's GEMM. Zero padding only (other padding modes are an explicit pad before the conv).
//
//   x  (N, C, H, W)        w  (K, C/groups, R, S)        y  (N, K, P, Q)
//   y[n, k, p, q] = bias[k] + sum_{c in group(k), r, s} w[k, c, r, s] * x[n, c, p*sh - ph + r*dh,
//                                                                       q*sw - pw + s*dw]
// Tensors are 4-D strided views (element strides, NCHW dim order, any memory format). The weight
// (and its gradient) must have (C/groups, R, S) flattenable: w.s[1] == R*S*w.s[3] and w.s[2] ==
// S*w.s[3]; the bindings check it.
//
// On the CPU, all three passes run on the project's GEMM (cpu/gemm.h). Per image n and group g,
// with Cg = C/groups, Kg = K/groups, CRS = Cg*R*S:
//
//   forward          Y[n]_g (Kg x PQ)  = W_g (Kg x CRS) . col (CRS x PQ), bias in the store
//   backward-data    stride 1: the forward of dY with the flipped, channel-transposed weight;
//                    else dcol (CRS x PQ) = W_g^T (CRS x Kg) . dY[n]_g, then col2im (+=)
//   backward-weight  dW_g (Kg x CRS)  += dY[n]_g (Kg x PQ) . col^T (PQ x CRS)
//
// Depthwise convolutions (groups == C) run as direct loops instead (see "depthwise" below).
// col = im2col of x[n]_g. The forward never materialises it: the GEMM calls a packing routine
// that writes im2col rows straight into its B panels (so col exists one cache block at a time,
// and the GEMM's threads share the work), from zero-bordered copies of the image where every
// im2col row is a plain offset (PaddedPacker: one plane per channel at stride 1, the stride's
// phase planes otherwise), past 16 phases with bounds checks (ColPacker). The backward passes build
// it in chunks of output pixels (kColBudget elements per thread) instead of 9x a large input.
// Pointwise convolutions (1x1, stride 1, no padding) skip im2col: col is x[n]_g itself, read in
// place. Work runs across images in parallel when there are enough of them (single-threaded GEMMs,
// one scratch area per thread), otherwise image by image with multi-threaded GEMMs. Maps of fewer
// than kMergeBelow output pixels instead put every image's pixels side by side in the GEMMs'
// columns ("small feature maps" below), and 3x3 stride-1 layers with enough channels run all three
// passes as Winograd F(2x2, 3x3) ("Winograd" below).
#include "common/simd.h"

// ================================================== depthwise plane loops (compiled once per ISA)
// One (image, channel) plane at a time, the input already copied into a zero-bordered plane that
// covers every window (the driver's DwPlane): every tap of every output row is one unchecked loop
// over the output width, vectorised by the compiler for this pass's ISA.
namespace nnk {
namespace cpu {
// The geometry the plane loops need (plain data: the same definition in every pass).
struct DwGeom {
  int64_t P, Q, R, S, sh, sw, dh, dw;
  int64_t Wp;  // row pitch of the plane
};
// dy rows and outputs are contiguous P x Q; w(r, t) = wk[r * ws2 + t * ws3].
template <class T>
struct ConvDepthwiseKernels {
  // y (P x Q) = bias + sum_{r,t} w(r,t) plane[(p sh + r dh) Wp + q sw + t dw]; acc: scratch of
  // P * Wp.
  void (*forward)(const DwGeom& g, const T* plane, const T* wk, int64_t ws2, int64_t ws3, T bias,
                  T* acc, T* y);
  // plane[(p sh + r dh) Wp + q sw + t dw] += w(r,t) dy[p, q]
  void (*backward_data)(const DwGeom& g, const T* dy, const T* wk, int64_t ws2, int64_t ws3,
                        T* plane);
  // acc[r S + t] += sum_{p,q} dy[p, q] plane[...] (each row's sum in T, the rows in float64);
  // acc[R S] += sum dy when `bias`.
  void (*backward_weight)(const DwGeom& g, const T* dy, const T* plane, bool bias, double* acc);
};
// Depthwise on small maps, channels-last: a block of Cp channels (a multiple of 16, so of every
// pass's vector width) is innermost, so each tap is one vector FMA over channels. Pixel (h, v) of
// the zero-bordered input block at x[(h * Wp + v) * Cp], output (or output gradient) pixel (p, q)
// at y[(p * Q + q) * Cp], tap (r, t) at w[(r * S + t) * Cp].
struct DwClGeom {
  int64_t P, Q, R, S, sh, sw, dh, dw;
  int64_t Wp, Cp;
};
template <class T>
struct ConvDepthwiseClKernels {
  // y = bias (or 0) + sum_{r,t} w(r,t) x[window + tap]
  void (*forward)(const DwClGeom& g, const T* x, const T* w, const T* bias, T* y);
  // x[window + tap] += w(r,t) dy (x: the zeroed block of the input gradient)
  void (*backward_data)(const DwClGeom& g, const T* dy, const T* w, T* x);
  // acc[(r S + t) Cp + c] = sum_pixels dy x[window + tap], acc[R S Cp + c] = sum dy (bias)
  void (*backward_weight)(const DwClGeom& g, const T* dy, const T* x, bool bias, T* acc);
};
// Winograd F(2x2, 3x3) transforms of one row of tw tiles (the driver's winograd_forward).
template <class T>
struct ConvWinogradKernels {
  // d: 4 input rows of 2 tw + 2 columns (row stride ld); v[xi * vld + tx] = (B^T d_tx B)[xi]
  // for the 16 positions xi of each tile tx.
  void (*input_row)(const T* d, int64_t ld, int64_t tw, T* v, int64_t vld);
  // y: 2 rows of 2 tw columns (row stride ldy) = A^T m_tx A + bias, m[xi * mld + tx].
  void (*output_row)(const T* m, int64_t mld, int64_t tw, T bias, T* y, int64_t ldy);
  // The adjoint of output_row: m[xi * mld + tx] = (A dy_tx A^T)[xi] for the 2x2 tiles of dy.
  void (*grad_output_row)(const T* dy, int64_t ldy, int64_t tw, T* m, int64_t mld);
};
}  // namespace cpu

namespace NNK_ISA_NS {

template <class T>
struct WinogradLoops {
  static void input_row(const T* __restrict d, int64_t ld, int64_t tw, T* __restrict v,
                        int64_t vld) {
    // Tile tx reads columns 2tx .. 2tx+3 of each row: even[tx], odd[tx], even[tx+1], odd[tx+1]
    // of the rows of B^T d.
    for (int64_t q = 0; q < tw; ++q) {
      T t[4][4];
      for (int j = 0; j < 4; ++j) {
        const T d0 = d[2 * q + j], d1 = d[ld + 2 * q + j], d2 = d[2 * ld + 2 * q + j],
                d3 = d[3 * ld + 2 * q + j];
        t[0][j] = d0 - d2;
        t[1][j] = d1 + d2;
        t[2][j] = d2 - d1;
        t[3][j] = d1 - d3;
      }
      for (int i = 0; i < 4; ++i) {
        v[(4 * i + 0) * vld + q] = t[i][0] - t[i][2];
        v[(4 * i + 1) * vld + q] = t[i][1] + t[i][2];
        v[(4 * i + 2) * vld + q] = t[i][2] - t[i][1];
        v[(4 * i + 3) * vld + q] = t[i][1] - t[i][3];
      }
    }
  }

  static void output_row(const T* __restrict m, int64_t mld, int64_t tw, T bias, T* __restrict y,
                         int64_t ldy) {
    for (int64_t q = 0; q < tw; ++q) {
      T t[2][4];
      for (int j = 0; j < 4; ++j) {
        const T m0 = m[j * mld + q], m1 = m[(4 + j) * mld + q], m2 = m[(8 + j) * mld + q],
                m3 = m[(12 + j) * mld + q];
        t[0][j] = m0 + m1 + m2;
        t[1][j] = m1 - m2 - m3;
      }
      for (int i = 0; i < 2; ++i) {
        y[i * ldy + 2 * q] = t[i][0] + t[i][1] + t[i][2] + bias;
        y[i * ldy + 2 * q + 1] = t[i][1] - t[i][2] - t[i][3] + bias;
      }
    }
  }

  static void grad_output_row(const T* __restrict dy, int64_t ldy, int64_t tw, T* __restrict m,
                              int64_t mld) {
    for (int64_t q = 0; q < tw; ++q) {
      const T y00 = dy[2 * q], y01 = dy[2 * q + 1], y10 = dy[ldy + 2 * q],
              y11 = dy[ldy + 2 * q + 1];
      const T r[4][2] = {{y00, y01}, {y00 + y10, y01 + y11}, {y00 - y10, y01 - y11}, {-y10, -y11}};
      for (int i = 0; i < 4; ++i) {
        m[(4 * i + 0) * mld + q] = r[i][0];
        m[(4 * i + 1) * mld + q] = r[i][0] + r[i][1];
        m[(4 * i + 2) * mld + q] = r[i][0] - r[i][1];
        m[(4 * i + 3) * mld + q] = -r[i][1];
      }
    }
  }

  static constexpr cpu::ConvWinogradKernels<T> table() {
    return {input_row, output_row, grad_output_row};
  }
};

NNK_ISA_TABLE(conv_winograd_kernels, cpu::ConvWinogradKernels, WinogradLoops)

template <class T>
struct DepthwiseLoops {
  // acc[i] += a * x[i * step], i < n
  static NNK_INLINE void axpy(T* __restrict acc, T a, const T* __restrict x, int64_t step,
                              int64_t n) {
    if (step == 1) {
      for (int64_t i = 0; i < n; ++i) acc[i] += a * x[i];
    } else {
      for (int64_t i = 0; i < n; ++i) acc[i] += a * x[i * step];
    }
  }

  // sum_i a[i] * b[i * sb], i < n; in 8 independent lanes for unit strides, so it vectorises
  // without reassociation flags.
  static NNK_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t sb, int64_t n) {
    T sum = T(0);
    int64_t i = 0;
    if (sb == 1) {
      T lane[8] = {};
      for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; ++l) lane[l] += a[i + l] * b[i + l];
      for (int l = 0; l < 8; ++l) sum += lane[l];
    }
    for (; i < n; ++i) sum += a[i] * b[i * sb];
    return sum;
  }

  static void forward(const cpu::DwGeom& g, const T* plane, const T* wk, int64_t ws2, int64_t ws3,
                      T bias, T* acc, T* y) {
    if (g.sh == 1 && g.sw == 1) {
      // Outputs at the plane's pitch: acc[p Wp + q], so each tap is one run of (P-1) Wp + Q
      // values instead of P runs of Q (the columns q >= Q in between are computed and dropped).
      const int64_t n = (g.P - 1) * g.Wp + g.Q;
      for (int64_t i = 0; i < n; ++i) acc[i] = bias;
      for (int64_t r = 0; r < g.R; ++r)
        for (int64_t t = 0; t < g.S; ++t)
          axpy(acc, wk[r * ws2 + t * ws3], plane + r * g.dh * g.Wp + t * g.dw, 1, n);
      for (int64_t p = 0; p < g.P; ++p)
        for (int64_t q = 0; q < g.Q; ++q) y[p * g.Q + q] = acc[p * g.Wp + q];
      return;
    }
    for (int64_t p = 0; p < g.P; ++p) {
      T* yr = y + p * g.Q;
      for (int64_t q = 0; q < g.Q; ++q) yr[q] = bias;
      for (int64_t r = 0; r < g.R; ++r) {
        const T* xr = plane + (p * g.sh + r * g.dh) * g.Wp;
        for (int64_t t = 0; t < g.S; ++t) axpy(yr, wk[r * ws2 + t * ws3], xr + t * g.dw, g.sw, g.Q);
      }
    }
  }

  static void backward_data(const cpu::DwGeom& g, const T* dy, const T* wk, int64_t ws2,
                            int64_t ws3, T* plane) {
    for (int64_t p = 0; p < g.P; ++p) {
      const T* dyr = dy + p * g.Q;
      for (int64_t r = 0; r < g.R; ++r) {
        T* dr = plane + (p * g.sh + r * g.dh) * g.Wp;
        for (int64_t t = 0; t < g.S; ++t) {
          const T wv = wk[r * ws2 + t * ws3];
          T* __restrict d = dr + t * g.dw;
          if (g.sw == 1) {
            axpy(d, wv, dyr, 1, g.Q);
          } else {
            for (int64_t q = 0; q < g.Q; ++q) d[q * g.sw] += wv * dyr[q];
          }
        }
      }
    }
  }

  static void backward_weight(const cpu::DwGeom& g, const T* dy, const T* plane, bool bias,
                              double* acc) {
    for (int64_t p = 0; p < g.P; ++p) {
      const T* dyr = dy + p * g.Q;
      if (bias) {
        T sum = T(0);
        for (int64_t q = 0; q < g.Q; ++q) sum += dyr[q];
        acc[g.R * g.S] += double(sum);
      }
      for (int64_t r = 0; r < g.R; ++r) {
        const T* xr = plane + (p * g.sh + r * g.dh) * g.Wp;
        for (int64_t t = 0; t < g.S; ++t)
          acc[r * g.S + t] += double(dot(dyr, xr + t * g.dw, g.sw, g.Q));
      }
    }
  }

  static constexpr cpu::ConvDepthwiseKernels<T> table() {
    return {forward, backward_data, backward_weight};
  }
};

NNK_ISA_TABLE(conv_depthwise_kernels, cpu::ConvDepthwiseKernels, DepthwiseLoops)

template <class T>
struct DepthwiseClLoops {
  using Sd = Simd<T>;
  using V = typename Sd::V;
  static constexpr int W = Sd::W;

  // kR x kS taps known at compile time (3x3: the weights of a channel vector stay in registers),
  // or kR == 0: g.R x g.S read from w at every pixel.
  template <int kR, int kS>
  static NNK_INLINE void forward_taps(const cpu::DwClGeom& g, const T* __restrict x,
                                      const T* __restrict w, const T* bias, T* __restrict y) {
    const int64_t R = kR ? kR : g.R, S = kR ? kS : g.S, Cp = g.Cp;
    for (int64_t c = 0; c < Cp; c += W) {
      V wv[kR ? kR * kS : 1];
      if constexpr (kR > 0)
#pragma GCC unroll 16
        for (int i = 0; i < kR * kS; ++i) wv[i] = Sd::load(w + i * Cp + c);
      const V b = bias ? Sd::load(bias + c) : Sd::zero();
      for (int64_t p = 0; p < g.P; ++p)
        for (int64_t q = 0; q < g.Q; ++q) {
          const T* xo = x + (p * g.sh * g.Wp + q * g.sw) * Cp + c;
          V acc = b;
#pragma GCC unroll 16
          for (int64_t r = 0; r < R; ++r)
#pragma GCC unroll 16
            for (int64_t t = 0; t < S; ++t) {
              const V wt = kR ? wv[r * S + t] : Sd::load(w + (r * S + t) * Cp + c);
              acc = Sd::fma(wt, Sd::load(xo + (r * g.dh * g.Wp + t * g.dw) * Cp), acc);
            }
          Sd::store(y + (p * g.Q + q) * Cp + c, acc);
        }
    }
  }
  static void forward(const cpu::DwClGeom& g, const T* x, const T* w, const T* bias, T* y) {
    if (g.R == 3 && g.S == 3) return forward_taps<3, 3>(g, x, w, bias, y);
    forward_taps<0, 0>(g, x, w, bias, y);
  }

  static void backward_data(const cpu::DwClGeom& g, const T* __restrict dy, const T* __restrict w,
                            T* __restrict x) {
    const int64_t Cp = g.Cp;
    for (int64_t p = 0; p < g.P; ++p)
      for (int64_t q = 0; q < g.Q; ++q) {
        T* xo = x + (p * g.sh * g.Wp + q * g.sw) * Cp;
        const T* d = dy + (p * g.Q + q) * Cp;
        for (int64_t c = 0; c < Cp; c += W) {
          const V dv = Sd::load(d + c);
          for (int64_t r = 0; r < g.R; ++r)
            for (int64_t t = 0; t < g.S; ++t) {
              T* xx = xo + (r * g.dh * g.Wp + t * g.dw) * Cp + c;
              Sd::store(xx, Sd::fma(Sd::load(w + (r * g.S + t) * Cp + c), dv, Sd::load(xx)));
            }
        }
      }
  }

  template <int kR, int kS>
  static NNK_INLINE void weight_taps(const cpu::DwClGeom& g, const T* __restrict dy,
                                     const T* __restrict x, bool bias, T* __restrict acc) {
    const int64_t R = kR ? kR : g.R, S = kR ? kS : g.S, Cp = g.Cp;
    for (int64_t c = 0; c < Cp; c += W) {
      V a[kR ? kR * kS : 1];
      if constexpr (kR > 0)
#pragma GCC unroll 16
        for (int i = 0; i < kR * kS; ++i) a[i] = Sd::zero();
      else
        for (int64_t i = 0; i < R * S; ++i) Sd::store(acc + i * Cp + c, Sd::zero());
      V sb = Sd::zero();
      for (int64_t p = 0; p < g.P; ++p)
        for (int64_t q = 0; q < g.Q; ++q) {
          const T* xo = x + (p * g.sh * g.Wp + q * g.sw) * Cp + c;
          const V dv = Sd::load(dy + (p * g.Q + q) * Cp + c);
          sb = Sd::add(sb, dv);
#pragma GCC unroll 16
          for (int64_t r = 0; r < R; ++r)
#pragma GCC unroll 16
            for (int64_t t = 0; t < S; ++t) {
              const V xv = Sd::load(xo + (r * g.dh * g.Wp + t * g.dw) * Cp);
              if constexpr (kR > 0) {
                a[r * S + t] = Sd::fma(dv, xv, a[r * S + t]);
              } else {
                T* ai = acc + (r * S + t) * Cp + c;
                Sd::store(ai, Sd::fma(dv, xv, Sd::load(ai)));
              }
            }
        }
      if constexpr (kR > 0)
#pragma GCC unroll 16
        for (int i = 0; i < kR * kS; ++i) Sd::store(acc + i * Cp + c, a[i]);
      if (bias) Sd::store(acc + R * S * Cp + c, sb);
    }
  }
  static void backward_weight(const cpu::DwClGeom& g, const T* dy, const T* x, bool bias, T* acc) {
    if (g.R == 3 && g.S == 3) return weight_taps<3, 3>(g, dy, x, bias, acc);
    weight_taps<0, 0>(g, dy, x, bias, acc);
  }

  static constexpr cpu::ConvDepthwiseClKernels<T> table() {
    return {forward, backward_data, backward_weight};
  }
};

NNK_ISA_TABLE(conv_depthwise_cl_kernels, cpu::ConvDepthwiseClKernels, DepthwiseClLoops)

}  // namespace NNK_ISA_NS
}  // namespace nnk

// ======================================================================== driver (compiled once)
#if NNK_BASELINE_PASS
#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/conv2d_args.h"
#include "common/isa.h"
#include "common/threading.h"
#include "common/workspace.h"
#include "cpu/gemm.h"
#include "cpu/reduce.h"

namespace nnk {
NNK_PER_ISA(template <class T> const cpu::ConvDepthwiseKernels<T>& conv_depthwise_kernels())
NNK_PER_ISA(template <class T> const cpu::ConvDepthwiseClKernels<T>& conv_depthwise_cl_kernels())
NNK_PER_ISA(template <class T> const cpu::ConvWinogradKernels<T>& conv_winograd_kernels())

namespace cpu {

namespace {

// The CPU code's view of a pass: the geometry (Conv2dArgs without the strides, which the
// pass's View4s carry).
struct Conv2dShape {
  int64_t N = 0, C = 0, H = 0, W = 0;  // input
  int64_t K = 0, R = 0, S = 0;         // weight (K, C / groups, R, S)
  int64_t P = 0, Q = 0;                // output
  int64_t sh = 1, sw = 1;              // stride
  int64_t ph = 0, pw = 0;              // padding before (top, left); after follows from P, Q
  int64_t dh = 1, dw = 1;              // dilation
  int64_t groups = 1;
};

template <class T>
struct View4 {
  T* p = nullptr;
  int64_t s[4] = {};  // strides of dims (N|K, C, H|R, W|S)
};

// Elements of im2col buffer per thread (1 MiB of float32 keeps it in L2/L3 next to the packing).
constexpr int64_t kColBudget = int64_t(1) << 18;

#define NNK_CONV_INLINE inline __attribute__((always_inline))

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// The output columns q in [q0, q1) whose input column q*stride + off lies in [0, limit).
inline void valid_cols(int64_t off, int64_t stride, int64_t limit, int64_t q0, int64_t q1,
                       int64_t* lo, int64_t* hi) {
  const int64_t first = off >= 0 ? 0 : (-off + stride - 1) / stride;
  const int64_t last = limit - 1 - off < 0 ? -1 : (limit - 1 - off) / stride;  // inclusive
  *lo = max64(q0, first);
  *hi = max64(*lo, min64(q1, last + 1));
}

// dst[i] = src[i * step] for i < n; restrict so that the contiguous case vectorises.
template <class T>
inline void copy_run(T* __restrict dst, const T* __restrict src, int64_t n, int64_t step) {
  if (step == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * step];
  }
}

// dst[i * step] = src[i] for i < n.
template <class T>
inline void copy_out(T* __restrict dst, int64_t step, const T* __restrict src, int64_t n) {
  if (step == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * step] = src[i];
  }
}

// d[j] = input row ih of channel xc at column j * step + phase - pw for j < width, zero where it
// leaves the input (all zero for a row outside it): one row of a zero-bordered copy (PaddedPacker,
// the depthwise planes, Winograd's input tiles); step > 1 for one phase plane of a strided layer.
template <class T>
inline void padded_row(const Conv2dShape& s, const T* xc, int64_t xs2, int64_t xs3, int64_t ih,
                       T* d, int64_t width, int64_t step = 1, int64_t phase = 0) {
  const int64_t first = s.pw - phase;  // d[j] reads column j * step - first
  int64_t lo = 0, hi = 0;              // columns of d that hold input
  if (ih >= 0 && ih < s.H) {
    lo = min64(width, first <= 0 ? 0 : (first + step - 1) / step);
    hi = max64(lo, min64(width, (max64(0, s.W + first) + step - 1) / step));
  }
  for (int64_t j = 0; j < lo; ++j) d[j] = T(0);
  if (hi > lo) copy_run(d + lo, xc + ih * xs2 + (lo * step - first) * xs3, hi - lo, xs3 * step);
  for (int64_t j = hi; j < width; ++j) d[j] = T(0);
}

template <class T>
struct Geometry {
  const Conv2dShape& s;
  int64_t Cg, Kg, CRS, PQ, L;
  bool pointwise;  // 1x1, stride 1, no padding: col is x itself

  explicit Geometry(const Conv2dShape& sh)
      : s(sh),
        Cg(sh.C / sh.groups),
        Kg(sh.K / sh.groups),
        CRS(sh.C / sh.groups * sh.R * sh.S),
        PQ(sh.P * sh.Q),
        L(0),
        pointwise(sh.R == 1 && sh.S == 1 && sh.sh == 1 && sh.sw == 1 && sh.ph == 0 && sh.pw == 0) {
    // Chunk of output pixels: the whole image when its im2col fits the budget, else a multiple
    // of 16 (whole GEMM panels on every ISA).
    L = PQ;
    if (CRS > 0 && CRS * PQ > kColBudget) L = max64(16, kColBudget / CRS / 16 * 16);
    if (L > PQ) L = PQ;
  }

  // Pointwise needs x[n]_g to be a (Cg x H*W) matrix: (h, w) must flatten.
  bool pointwise_ok(const View4<const T>& x) const {
    return pointwise && (s.H <= 1 || x.s[2] == s.W * x.s[3]);
  }

  // One row of im2col: row (c, r, t) of col over output pixels [j0, j0 + len) of image n, group
  // g, into out[0, len): x under the window, zeros where it leaves the input. kCol2Im: the
  // adjoint instead, x[n]_g += out scattered back (x is then the gradient being accumulated).
  template <bool kCol2Im>
  void im2col_row(std::conditional_t<kCol2Im, T*, const T*> xbase, const int64_t* xs, int64_t n,
                  int64_t g, int64_t c, int64_t r, int64_t t, int64_t j0, int64_t len,
                  std::conditional_t<kCol2Im, const T*, T*> out) const {
    const int64_t chan = n * xs[0] + (g * Cg + c) * xs[1], step = s.sw * xs[3];
    const int64_t hoff = r * s.dh - s.ph, woff = t * s.dw - s.pw;
    // Output columns whose window column lies inside the input: [qa, qb), for every row.
    int64_t qa, qb;
    valid_cols(woff, s.sw, s.W, 0, s.Q, &qa, &qb);
    int64_t p = j0 / s.Q, q = j0 % s.Q;
    for (int64_t done = 0; done < len; q = 0, ++p) {
      // Output columns [q, qe) of output row p are seg[q, qe).
      const int64_t qn = min64(s.Q - q, len - done), qe = q + qn;
      auto* seg = out + done - q;  // done >= q always
      done += qn;
      const int64_t ih = p * s.sh + hoff;
      const bool inside = ih >= 0 && ih < s.H;
      const int64_t lo = inside ? max64(q, min64(qa, qe)) : qe;
      const int64_t hi = inside ? max64(lo, min64(qb, qe)) : qe;
      const int64_t at = chan + ih * xs[2] + woff * xs[3];  // x under output column 0
      if constexpr (kCol2Im) {
        T* dst = xbase + at;
        for (int64_t qq = lo; qq < hi; ++qq) dst[qq * step] += seg[qq];
      } else {
        for (int64_t qq = q; qq < lo; ++qq) seg[qq] = T(0);
        if (hi > lo) copy_run(seg + lo, xbase + at + lo * step, hi - lo, step);
        for (int64_t qq = hi; qq < qe; ++qq) seg[qq] = T(0);
      }
    }
  }

  // col (CRS x len, row stride ld) = im2col of x[n]_g for output pixels [j0, j0 + len);
  // kCol2Im: x[n]_g += col2im(col).
  template <bool kCol2Im>
  void im2col(std::conditional_t<kCol2Im, T*, const T*> xbase, const int64_t* xs, int64_t n,
              int64_t g, int64_t j0, int64_t len, std::conditional_t<kCol2Im, const T*, T*> col,
              int64_t ld) const {
    for (int64_t c = 0, row = 0; c < Cg; ++c)
      for (int64_t r = 0; r < s.R; ++r)
        for (int64_t t = 0; t < s.S; ++t, ++row)
          im2col_row<kCol2Im>(xbase, xs, n, g, c, r, t, j0, len, col + row * ld);
  }
};

// d[q * panel + i] = row[q * nr + i] for q < ncols / nr, i < nr, and the last partial piece
// zero-filled to nr: one im2col row of `ncols` columns spread over the GEMM's B panels
// (Gemm::pack_b_fn's layout; panel = nr * k).
template <int NR, class T>
NNK_CONV_INLINE void copy_pieces(T* __restrict d, const T* __restrict row, int64_t full,
                                 int64_t panel) {
  for (int64_t q = 0; q < full; ++q) std::memcpy(d + q * panel, row + q * NR, NR * sizeof(T));
}

template <class T>
inline void row_to_panels(T* d, const T* row, int64_t ncols, int nr, int64_t panel) {
  const int64_t full = ncols / nr, rest = ncols % nr;
  switch (nr) {  // fixed-size copies inline; every kernel's NR is one of these
    case 4:
      copy_pieces<4>(d, row, full, panel);
      break;
    case 8:
      copy_pieces<8>(d, row, full, panel);
      break;
    case 16:
      copy_pieces<16>(d, row, full, panel);
      break;
    case 32:
      copy_pieces<32>(d, row, full, panel);
      break;
    default:
      for (int64_t q = 0; q < full; ++q)
        std::memcpy(d + q * panel, row + q * nr, size_t(nr) * sizeof(T));
  }
  if (rest) {
    std::memcpy(d + full * panel, row + full * nr, size_t(rest) * sizeof(T));
    std::memset(d + full * panel + rest, 0, size_t(nr - rest) * sizeof(T));
  }
}

// The forward GEMM's B (col of image n, group g) written straight into the GEMM's panels
// (Gemm::pack_b_fn): one im2col row at a time into an L1 buffer, then NR-wide pieces to each panel.
template <class T>
struct ColPacker {
  static constexpr int64_t kMaxCols = 4096;  // the GEMM packs at most this many columns at once
  const Geometry<T>* gm;
  const T* x;
  const int64_t* xs;
  int64_t n, g;

  static void pack(const void* ctx, int64_t p0, int64_t k, int64_t j0, int64_t ncols, int nr,
                   T* dst) {
    const ColPacker& cp = *static_cast<const ColPacker*>(ctx);
    const Conv2dShape& s = cp.gm->s;
    alignas(64) T row[kMaxCols];
    int64_t c = p0 / (s.R * s.S), r = p0 / s.S % s.R, t = p0 % s.S;
    for (int64_t kk = 0; kk < k; ++kk) {
      cp.gm->template im2col_row<false>(cp.x, cp.xs, cp.n, cp.g, c, r, t, j0, ncols, row);
      row_to_panels(dst + kk * nr, row, ncols, nr, int64_t(nr) * k);
      if (++t == s.S) {
        t = 0;
        if (++r == s.R) r = 0, ++c;
      }
    }
  }
};

// x[n]_g is copied once into zero-bordered planes xp that cover every window, so that every
// im2col row is a plain offset into them, contiguous along each output row. Stride 1: one plane
// per channel (Cg x Hp x Wp), im2col row (c, r, t) is xp + c*Hp*Wp + r*dh*Wp + t*dw read at
// p*Wp + q for output pixel (p, q). Stride sh x sw: each channel is split into sh*sw phase planes,
// plane (a, b) holding the padded input's rows i*sh + a and columns j*sw + b; tap (r, t) of
// output pixel (p, q) reads padded row p*sh + r*dh = (p + r*dh / sh) * sh + r*dh % sh, i.e. plane
// (r*dh % sh, t*dw % sw) at row p + r*dh / sh, column q + t*dw / sw: again one offset per im2col
// row, read at p*Wp + q (ResNet's stride-2 3x3 64 -> 128 at 56x56: packing fell from 19% to
// about 8% of the layer's time under perf against ColPacker's bounds-checked gathers). Packing is
// then copies of whole NR-wide pieces (split only where an
// output row ends). Small maps (merged columns, below) stack several images' copies `img`
// elements apart, and the GEMM's column 0 is merged column J0 of the first stacked image: column
// J is pixel J % PQ of image J / PQ.
template <class T>
struct PaddedPacker {
  static constexpr int64_t kMaxK = 1024;  // the GEMM packs at most kc <= this many rows at once
  const Geometry<T>* gm;
  const T* xp;
  int64_t Hp, Wp;
  int64_t img = 0, J0 = 0;

  // Rows and columns of one plane, and elements per channel (all its phase planes).
  static int64_t rows(const Conv2dShape& s) { return s.P + (s.R - 1) * s.dh / s.sh; }
  static int64_t cols(const Conv2dShape& s) { return s.Q + (s.S - 1) * s.dw / s.sw; }
  static int64_t channel(const Conv2dShape& s) { return s.sh * s.sw * rows(s) * cols(s); }
  // Strided layers: at most this many phase planes per channel (a 7x7 stride-7 patchify would
  // read 1 of each 49 planes' rows per tap: ColPacker's gathers are no worse there).
  static constexpr int64_t kMaxPhases = 16;
  static bool ok(const Conv2dShape& s) { return s.sh * s.sw <= kMaxPhases; }

  // Whether some tap (r < R) reads phase a of a stride-`stride` axis (a 1x1 stride-2 layer reads
  // only phase 0: the others are never filled).
  static bool phase_used(int64_t a, int64_t R, int64_t d, int64_t stride) {
    for (int64_t r = 0; r < R && r < stride; ++r)
      if (r * d % stride == a) return true;
    return false;
  }

  // xp = x[n]_g with ph rows / pw columns of zeros before (negative: cropped) and enough after,
  // as each channel's phase planes.
  static void fill(const Geometry<T>& gm, const View4<const T>& x, int64_t n, int64_t g, T* xp,
                   int nthreads) {
    parallel_for(
        gm.Cg, 1, [&](int64_t c0, int64_t c1) { fill_channels(gm, x, n, g, xp, c0, c1); },
        nthreads);
  }

  // Images [n0, n1) stacked, Cg * Hp * Wp elements apart.
  static void fill_images(const Geometry<T>& gm, const View4<const T>& x, int64_t n0, int64_t n1,
                          int64_t g, T* xp, int nthreads) {
    const int64_t img = gm.Cg * channel(gm.s);
    parallel_for((n1 - n0) * gm.Cg, 1,
                 [&](int64_t b, int64_t e) {
                   for (int64_t i = b; i < e; ++i)
                     fill_channels(gm, x, n0 + i / gm.Cg, g, xp + i / gm.Cg * img, i % gm.Cg,
                                   i % gm.Cg + 1);
                 },
                 nthreads);
  }

  static void fill_channels(const Geometry<T>& gm, const View4<const T>& x, int64_t n, int64_t g,
                            T* xp, int64_t c0, int64_t c1) {
    const Conv2dShape& s = gm.s;
    const int64_t Hp = rows(s), Wp = cols(s);
    for (int64_t c = c0; c < c1; ++c) {
      const T* xc = x.p + n * x.s[0] + (g * gm.Cg + c) * x.s[1];
      for (int64_t a = 0; a < s.sh; ++a) {
        if (!phase_used(a, s.R, s.dh, s.sh)) continue;
        for (int64_t b = 0; b < s.sw; ++b) {
          if (!phase_used(b, s.S, s.dw, s.sw)) continue;
          T* plane = xp + c * channel(s) + (a * s.sw + b) * Hp * Wp;
          for (int64_t i = 0; i < Hp; ++i)
            padded_row(s, xc, x.s[2], x.s[3], i * s.sh + a - s.ph, plane + i * Wp, Wp, s.sw, b);
        }
      }
    }
  }

  // d[kk * ld + e] = base[off[kk] + src + e] for kk < k, e < LEN: one piece of every packed row,
  // as fixed-size copies (the compiler emits vector moves, no calls).
  template <int LEN>
  static void copy_rows(T* __restrict d, int64_t ld, const T* __restrict base, const int64_t* off,
                        int64_t k, int64_t src) {
    for (int64_t kk = 0; kk < k; ++kk)
      std::memcpy(d + kk * ld, base + off[kk] + src, LEN * sizeof(T));
  }
  using CopyRows = void (*)(T*, int64_t, const T*, const int64_t*, int64_t, int64_t);
  template <int... L>
  static constexpr std::array<CopyRows, sizeof...(L) + 1> copy_table(
      std::integer_sequence<int, L...>) {
    return {nullptr, &copy_rows<L + 1>...};
  }
  static constexpr int kMaxPiece = 32;  // the widest NR of any kernel

  static void pack(const void* ctx, int64_t p0, int64_t k, int64_t j0, int64_t ncols, int nr,
                   T* dst) {
    const PaddedPacker& pp = *static_cast<const PaddedPacker*>(ctx);
    const Conv2dShape& s = pp.gm->s;
    int64_t off[kMaxK];  // xp offset of im2col row p0 + kk
    const int64_t chan = channel(s), plane = pp.Hp * pp.Wp;
    for (int64_t kk = 0, c = p0 / (s.R * s.S), r = p0 / s.S % s.R, t = p0 % s.S; kk < k; ++kk) {
      const int64_t a = r * s.dh % s.sh, b = t * s.dw % s.sw;
      off[kk] = c * chan + (a * s.sw + b) * plane + (r * s.dh / s.sh) * pp.Wp + t * s.dw / s.sw;
      if (++t == s.S) {
        t = 0;
        if (++r == s.R) r = 0, ++c;
      }
    }
    // Walk the columns as pieces that stay inside one output row and one panel; p counts output
    // rows across the stacked images.
    int64_t p = (pp.J0 + j0) / s.Q, q = (pp.J0 + j0) % s.Q;
    for (int64_t j = 0; j < ncols;) {
      const int64_t jj = j % nr, len = min64(min64(nr - jj, s.Q - q), ncols - j);
      T* d = dst + (j / nr) * nr * k + jj;
      static constexpr auto table = copy_table(std::make_integer_sequence<int, kMaxPiece>());
      table[len](d, nr, pp.xp, off, k, p / s.P * pp.img + p % s.P * pp.Wp + q);
      j += len;
      q += len;
      if (q == s.Q) q = 0, ++p;
    }
    if (const int64_t rest = ncols % nr) {  // zero the columns past ncols in the last panel
      T* d = dst + (ncols / nr) * nr * k;
      for (int64_t kk = 0; kk < k; ++kk)
        for (int64_t e = rest; e < nr; ++e) d[kk * nr + e] = T(0);
    }
  }
};

// Threads for the GEMMs of one image, and whether images run in parallel instead.
struct Split {
  int nt;       // threads available
  bool images;  // true: one image per thread at a time, single-threaded GEMMs
  int gemm_nt;  // threads per GEMM
};

inline Split split_for(int64_t N) {
  Split sp;
  sp.nt = in_parallel_region() ? 1 : num_threads();
  // Across images when they divide evenly among the threads, or are many.
  sp.images = sp.nt > 1 && N >= sp.nt && (N % sp.nt == 0 || N >= 4 * sp.nt);
  sp.gemm_nt = sp.images ? 1 : sp.nt;
  return sp;
}

// Scratch for `per_thread` elements per thread under `sp` (allocated before any parallel region).
template <class T>
T* image_scratch(const Split& sp, size_t per_thread) {
  return thread_scratch<T>(Scratch::conv, per_thread * size_t(sp.images ? sp.nt : 1) + 1);
}

// Runs body(n, tid, scratch) for n in [0, N) under `sp`; thread tid gets ws + per_thread * tid.
template <class T, class Body>
void for_each_image(int64_t N, const Split& sp, T* ws, size_t per_thread, Body body) {
  if (!sp.images) {
    for (int64_t n = 0; n < N; ++n) body(n, 0, ws);
    return;
  }
  parallel_for(
      N, 1,
      [&](int64_t b, int64_t e) {
        const int tid = thread_id();
        for (int64_t n = b; n < e; ++n) body(n, tid, ws + per_thread * size_t(tid));
      },
      sp.nt);
}

template <class T>
size_t gemm_scratch(Gemm<T> g, int nt, int64_t full, int64_t last) {
  g.N = full;
  size_t a = gemm_workspace(g, nt);
  g.N = last;
  return std::max(a, gemm_workspace(g, nt));
}

// ---------------------------------------------------------------------------------- depthwise
// groups == C (one input channel per group, K = C * mult): a GEMM with one row per group only
// packs, so direct loops instead (the plane loops above), per (image, channel) plane: the input
// plane is copied into a zero-bordered buffer that covers every window, so no tap of any row needs
// bounds work (on the 2x2 - 8x8 maps of MobileNetV2's deep layers that work cost more than the
// arithmetic); dy planes are gathered contiguous.

inline bool is_depthwise(const Conv2dShape& s) { return s.C > 1 && s.groups == s.C; }

// Elements of per-thread scratch for `n` elements, rounded to whole cache lines: threads write
// their own areas, which must not share a line (on a 2x2 map a plane is 64 bytes).
template <class T>
size_t per_thread_lines(int64_t n) {
  constexpr size_t line = 64 / sizeof(T);
  return (size_t(n) + line - 1) / line * line;
}

struct DwPlane {
  int64_t Hp, Wp;  // rows / columns that every window of the output touches
  explicit DwPlane(const Conv2dShape& s)
      : Hp(max64(0, (s.P - 1) * s.sh + (s.R - 1) * s.dh + 1)),
        Wp(max64(0, (s.Q - 1) * s.sw + (s.S - 1) * s.dw + 1)) {}

  DwGeom geom(const Conv2dShape& s) const {
    return DwGeom{s.P, s.Q, s.R, s.S, s.sh, s.sw, s.dh, s.dw, Wp};
  }

  // plane[i * Wp + j] = x[i - ph, j - pw], zero outside the input.
  template <class T>
  void fill(const Conv2dShape& s, const T* xc, int64_t xs2, int64_t xs3, T* plane) const {
    for (int64_t i = 0; i < Hp; ++i) padded_row(s, xc, xs2, xs3, i - s.ph, plane + i * Wp, Wp);
  }

  // dx[h, w] = plane[h + ph, w + pw]; input pixels outside the plane (under no window) get 0.
  template <class T>
  void crop(const Conv2dShape& s, const T* plane, T* dxc, int64_t xs2, int64_t xs3) const {
    const int64_t lo = min64(s.W, max64(0, -s.pw)), hi = max64(lo, min64(s.W, Wp - s.pw));
    for (int64_t h = 0; h < s.H; ++h) {
      T* row = dxc + h * xs2;
      const int64_t i = h + s.ph;
      const bool in = i >= 0 && i < Hp;
      for (int64_t w = 0; w < (in ? lo : s.W); ++w) row[w * xs3] = T(0);
      if (!in) continue;
      copy_out(row + lo * xs3, xs3, plane + i * Wp + lo + s.pw, hi - lo);
      for (int64_t w = hi; w < s.W; ++w) row[w * xs3] = T(0);
    }
  }
};

// dst (P x Q, contiguous) = the plane of a (N|K, C, P, Q) view at `src`.
template <class T>
void gather_plane(const Conv2dShape& s, const T* src, int64_t s2, int64_t s3, T* dst) {
  for (int64_t p = 0; p < s.P; ++p) copy_run(dst + p * s.Q, src + p * s2, s.Q, s3);
}

template <class T>
void depthwise_forward(const Conv2dShape& s, View4<const T> x, View4<const T> w, const T* bias,
                       View4<T> y) {
  const ConvDepthwiseKernels<T>& k = NNK_ISA_CALL(conv_depthwise_kernels<T>());
  const int64_t mult = s.K / s.C;
  const DwPlane dp(s);
  const DwGeom geom = dp.geom(s);
  const bool direct = y.s[3] == 1 && y.s[2] == s.Q;  // output planes contiguous: write in place
  // The plane, the accumulator (P * Wp) and, unless direct, one output plane.
  const int64_t plane = dp.Hp * dp.Wp, accn = s.P * dp.Wp;
  const size_t per = per_thread_lines<T>(plane + accn + (direct ? 0 : s.P * s.Q));
  const int nt = in_parallel_region() ? 1 : num_threads();
  T* scratch = thread_scratch<T>(Scratch::conv, per * nt + 1);
  parallel_for(
      s.N * s.C, 1,
      [&](int64_t b, int64_t e) {
        T* xp = scratch + per * size_t(thread_id());
        T* acc = xp + plane;
        T* out = acc + accn;
        for (int64_t i = b; i < e; ++i) {
          const int64_t n = i / s.C, c = i % s.C;
          dp.fill(s, x.p + n * x.s[0] + c * x.s[1], x.s[2], x.s[3], xp);
          for (int64_t kk = c * mult; kk < (c + 1) * mult; ++kk) {
            T* yk = y.p + n * y.s[0] + kk * y.s[1];
            k.forward(geom, xp, w.p + kk * w.s[0], w.s[2], w.s[3], bias ? bias[kk] : T(0), acc,
                      direct ? yk : out);
            if (!direct)
              for (int64_t p = 0; p < s.P; ++p)
                copy_out(yk + p * y.s[2], y.s[3], out + p * s.Q, s.Q);
          }
        }
      },
      nt);
}

template <class T>
void depthwise_backward_data(const Conv2dShape& s, View4<const T> dy, View4<const T> w,
                             View4<T> dx) {
  const ConvDepthwiseKernels<T>& k = NNK_ISA_CALL(conv_depthwise_kernels<T>());
  const int64_t mult = s.K / s.C;
  const DwPlane dp(s);
  const DwGeom geom = dp.geom(s);
  const int64_t plane = dp.Hp * dp.Wp;
  const size_t per = per_thread_lines<T>(plane + s.P * s.Q);  // dx plane, one dy plane
  const int nt = in_parallel_region() ? 1 : num_threads();
  T* scratch = thread_scratch<T>(Scratch::conv, per * nt + 1);
  parallel_for(
      s.N * s.C, 1,
      [&](int64_t b, int64_t e) {
        T* dxp = scratch + per * size_t(thread_id());  // dx[n, c] over the padded plane
        T* dyp = dxp + plane;
        for (int64_t i = b; i < e; ++i) {
          const int64_t n = i / s.C, c = i % s.C;
          std::fill(dxp, dxp + plane, T(0));
          for (int64_t kk = c * mult; kk < (c + 1) * mult; ++kk) {
            gather_plane(s, dy.p + n * dy.s[0] + kk * dy.s[1], dy.s[2], dy.s[3], dyp);
            k.backward_data(geom, dyp, w.p + kk * w.s[0], w.s[2], w.s[3], dxp);
          }
          dp.crop(s, dxp, dx.p + n * dx.s[0] + c * dx.s[1], dx.s[2], dx.s[3]);
        }
      },
      nt);
}

template <class T>
void depthwise_backward_weight(const Conv2dShape& s, View4<const T> x, View4<const T> dy,
                               View4<T> dw, T* dbias) {
  const ConvDepthwiseKernels<T>& k = NNK_ISA_CALL(conv_depthwise_kernels<T>());
  const int64_t mult = s.K / s.C, RS = s.R * s.S;
  const DwPlane dp(s);
  const DwGeom geom = dp.geom(s);
  const int64_t plane = dp.Hp * dp.Wp;
  const size_t per = per_thread_lines<T>(plane + s.P * s.Q);  // x plane, dy plane
  const int nt = in_parallel_region() ? 1 : num_threads();
  T* scratch = thread_scratch<T>(Scratch::conv, per * nt + 1);
  // One output channel per work item: its R*S taps (and bias) summed over images and rows,
  // each row's sum in T, the rows in float64.
  parallel_for(
      s.K, 1,
      [&](int64_t k0, int64_t k1) {
        T* xp = scratch + per * size_t(thread_id());
        T* dyp = xp + plane;
        std::vector<double> acc(size_t(RS) + 1);
        for (int64_t kk = k0; kk < k1; ++kk) {
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t n = 0; n < s.N; ++n) {
            dp.fill(s, x.p + n * x.s[0] + (kk / mult) * x.s[1], x.s[2], x.s[3], xp);
            gather_plane(s, dy.p + n * dy.s[0] + kk * dy.s[1], dy.s[2], dy.s[3], dyp);
            k.backward_weight(geom, dyp, xp, dbias != nullptr, acc.data());
          }
          for (int64_t r = 0; r < s.R; ++r)
            for (int64_t t = 0; t < s.S; ++t)
              dw.p[kk * dw.s[0] + r * dw.s[2] + t * dw.s[3]] = T(acc[size_t(r * s.S + t)]);
          if (dbias) dbias[kk] = T(acc[size_t(RS)]);
        }
      },
      nt);
}

// Rows [i0, i1) of a zero-bordered channels-last copy: d[(i * cols + j) * ld + c] = a[c * a1 +
// (i - top) * a2 + (j - left) * a3] for c < cw (all ld lanes 0 at pixels outside a's H x W
// plane; lanes cw..ld of the others untouched). Unit-stride rows are transposed in registers.
// Pixel rows' copy of x and the channel blocks of the channels-last depthwise build on it.
template <class T>
void channels_last_rows(decltype(GemmUKernel<T>::transpose) transpose, const T* a, int64_t a1,
                        int64_t a2, int64_t a3, int64_t H, int64_t W, int64_t top, int64_t left,
                        int64_t cols, int64_t i0, int64_t i1, int64_t cw, int64_t ld, T* d) {
  const int64_t lo = min64(cols, max64(0, left)), hi = max64(lo, min64(cols, W + left));
  for (int64_t i = i0; i < i1; ++i) {
    T* row = d + i * cols * ld;
    const int64_t h = i - top;
    if (h < 0 || h >= H || hi == lo) {
      std::fill(row, row + cols * ld, T(0));
      continue;
    }
    std::fill(row, row + lo * ld, T(0));
    std::fill(row + hi * ld, row + cols * ld, T(0));
    const T* src = a + h * a2 + (lo - left) * a3;
    T* dst = row + lo * ld;
    if (a3 == 1) {
      transpose(cw, hi - lo, src, a1, dst, ld);
    } else {
      for (int64_t j = 0; j < hi - lo; ++j)
        for (int64_t c = 0; c < cw; ++c) dst[j * ld + c] = src[c * a1 + j * a3];
    }
  }
}

// ----------------------------------------------------------------- depthwise, channels-last
// On small maps a plane is a few dozen pixels, and the plane loops above pay their per-plane
// setup (copy, loop bounds, a scalar sum per tap) for every image and channel: on MobileNetV2's
// 4x4 layers the data and weight gradients ran 3-5x slower than torch. Here a work item is one
// image and a block of kDwClBlock channels, copied channels-last into a zero-bordered block
// (register-blocked transposes), so every tap is one vector FMA across channels (the per-ISA
// DepthwiseClLoops); results go back to NCHW the same way. Multiplier 1 (K == C) only, and on
// maps of more than 256 output pixels only with 4+ work items (the plane loops split an image's
// channels finer). The weight gradient sums runs of at most kDwClSumPixels pixels in T and those
// in float64, like the plane loops' rows. Measured torch/ours on the 2-vCPU Xeon, 1 thread,
// forward / data / weight gradient, plane loops -> here: 384 ch 4x4 batch 8 0.39 / 0.27 / 0.25 ->
// 1.10 / 0.96 / 1.09; 144 ch 56x56 batch 2 0.90 / 0.53 / 0.72 -> 1.22 / 0.79 / 1.10; MobileNetV2
// at 64x64, batch 8, all its convolutions: 0.84 / 0.86 / 0.75 -> 1.23 / 1.45 / 1.56.
constexpr int64_t kDwClSumPixels = 256;  // the weight gradient's partial sums in T: pixels each  //
                                         // output pixels per image, at most
constexpr int64_t kDwClBlock = 32;       // channels per work item: a multiple of every vector width

inline bool depthwise_cl_ok(const Conv2dShape& s) {
  const int64_t items = s.N * ((s.C + kDwClBlock - 1) / kDwClBlock);
  return is_depthwise(s) && s.K == s.C && (s.P * s.Q <= 256 || items >= 4);
}

template <class T>
struct DwCl {
  const Conv2dShape& s;
  const DwPlane dp;
  const DwClGeom g;
  const int64_t blocks;  // channel blocks
  const decltype(GemmUKernel<T>::transpose) transpose;
  size_t xn, yn, wn;  // elements per block: input block, output block, taps (+ bias)

  explicit DwCl(const Conv2dShape& sh)
      : s(sh),
        dp(sh),
        g{sh.P, sh.Q, sh.R, sh.S, sh.sh, sh.sw, sh.dh, sh.dw, dp.Wp, kDwClBlock},
        blocks((sh.C + kDwClBlock - 1) / kDwClBlock),
        transpose(active_gemm_ukernel<T>().transpose),
        xn(size_t(dp.Hp * dp.Wp * kDwClBlock)),
        yn(size_t(sh.P * sh.Q * kDwClBlock)),
        wn(size_t((sh.R * sh.S + 1) * kDwClBlock)) {}
  size_t per_item() const { return per_thread_lines<T>(int64_t(xn + yn + wn)); }

  // d[(i * cols + j) * Cp + c] = a[c0 + c, i - top, j - left] for c < cw (0 outside the plane of
  // rows x cols; lanes past cw zero). a: channel c0's plane of one image, strides a1, a2, a3.
  void to_block(const T* a, int64_t a1, int64_t a2, int64_t a3, int64_t H, int64_t Wd, int64_t top,
                int64_t left, int64_t rows, int64_t cols, int64_t cw, T* d) const {
    if (cw < kDwClBlock) std::fill(d, d + rows * cols * kDwClBlock, T(0));  // the tail block
    channels_last_rows(transpose, a, a1, a2, a3, H, Wd, top, left, cols, 0, rows, cw, kDwClBlock,
                       d);
  }

  // a[c0 + c, h, v] = d[((h + top) * cols + v + left) * Cp + c] for h < H, v < Wd, c < cw (0 for
  // pixels outside the block's rows x cols).
  void from_block(const T* d, int64_t top, int64_t left, int64_t rows, int64_t cols, int64_t cw,
                  T* a, int64_t a1, int64_t a2, int64_t a3, int64_t H, int64_t Wd) const {
    const int64_t lo = min64(Wd, max64(0, -left)), hi = max64(lo, min64(Wd, cols - left));
    for (int64_t h = 0; h < H; ++h) {
      const int64_t i = h + top;
      const bool in = i >= 0 && i < rows;
      for (int64_t c = 0; c < cw; ++c) {
        T* row = a + c * a1 + h * a2;
        for (int64_t v = 0; v < (in ? lo : Wd); ++v) row[v * a3] = T(0);
        for (int64_t v = in ? hi : Wd; v < Wd; ++v) row[v * a3] = T(0);
      }
      if (!in || hi == lo) continue;
      const T* src = d + (i * cols + lo + left) * kDwClBlock;
      T* dst = a + h * a2 + lo * a3;
      if (a3 == 1) {
        transpose(hi - lo, cw, src, kDwClBlock, dst, a1);
      } else {
        for (int64_t v = 0; v < hi - lo; ++v)
          for (int64_t c = 0; c < cw; ++c) dst[c * a1 + v * a3] = src[v * kDwClBlock + c];
      }
    }
  }

  // wk[(r S + t) Cp + c] = w[c0 + c, 0, r, t], zero lanes past cw.
  void weights(View4<const T> w, int64_t c0, int64_t cw, T* wk) const {
    std::fill(wk, wk + s.R * s.S * kDwClBlock, T(0));
    for (int64_t c = 0; c < cw; ++c)
      for (int64_t r = 0; r < s.R; ++r)
        for (int64_t t = 0; t < s.S; ++t)
          wk[(r * s.S + t) * kDwClBlock + c] = w.p[(c0 + c) * w.s[0] + r * w.s[2] + t * w.s[3]];
  }

  // fn(n, c0, cw, scratch) for every (image, channel block), scratch = per_item() elements.
  template <class F>
  void for_each_item(F&& fn) const {
    const int nt = in_parallel_region() ? 1 : num_threads();
    const size_t per = per_item();
    T* ws = thread_scratch<T>(Scratch::conv, per * size_t(nt) + 1);
    parallel_for(
        s.N * blocks, 1,
        [&](int64_t b, int64_t e) {
          T* mine = ws + per * size_t(thread_id());
          for (int64_t i = b; i < e; ++i) {
            const int64_t c0 = i % blocks * kDwClBlock;
            fn(i / blocks, c0, min64(kDwClBlock, s.C - c0), mine);
          }
        },
        nt);
  }
};

template <class T>
void depthwise_cl_forward(const Conv2dShape& s, View4<const T> x, View4<const T> w, const T* bias,
                          View4<T> y) {
  const ConvDepthwiseClKernels<T>& k = NNK_ISA_CALL(conv_depthwise_cl_kernels<T>());
  const DwCl<T> d(s);
  d.for_each_item([&](int64_t n, int64_t c0, int64_t cw, T* ws) {
    T *xb = ws, *yb = xb + d.xn, *wk = yb + d.yn, *bk = wk + s.R * s.S * kDwClBlock;
    d.to_block(x.p + n * x.s[0] + c0 * x.s[1], x.s[1], x.s[2], x.s[3], s.H, s.W, s.ph, s.pw,
               d.dp.Hp, d.dp.Wp, cw, xb);
    d.weights(w, c0, cw, wk);
    if (bias) {
      std::fill(bk, bk + kDwClBlock, T(0));
      std::copy(bias + c0, bias + c0 + cw, bk);
    }
    k.forward(d.g, xb, wk, bias ? bk : nullptr, yb);
    d.from_block(yb, 0, 0, s.P, s.Q, cw, y.p + n * y.s[0] + c0 * y.s[1], y.s[1], y.s[2], y.s[3],
                 s.P, s.Q);
  });
}

template <class T>
void depthwise_cl_backward_data(const Conv2dShape& s, View4<const T> dy, View4<const T> w,
                                View4<T> dx) {
  const ConvDepthwiseClKernels<T>& k = NNK_ISA_CALL(conv_depthwise_cl_kernels<T>());
  const DwCl<T> d(s);
  d.for_each_item([&](int64_t n, int64_t c0, int64_t cw, T* ws) {
    T *xb = ws, *yb = xb + d.xn, *wk = yb + d.yn;
    d.to_block(dy.p + n * dy.s[0] + c0 * dy.s[1], dy.s[1], dy.s[2], dy.s[3], s.P, s.Q, 0, 0, s.P,
               s.Q, cw, yb);
    d.weights(w, c0, cw, wk);
    std::fill(xb, xb + d.xn, T(0));
    k.backward_data(d.g, yb, wk, xb);
    d.from_block(xb, s.ph, s.pw, d.dp.Hp, d.dp.Wp, cw, dx.p + n * dx.s[0] + c0 * dx.s[1], dx.s[1],
                 dx.s[2], dx.s[3], s.H, s.W);
  });
}

template <class T>
void depthwise_cl_backward_weight(const Conv2dShape& s, View4<const T> x, View4<const T> dy,
                                  View4<T> dw, T* dbias) {
  const ConvDepthwiseClKernels<T>& k = NNK_ISA_CALL(conv_depthwise_cl_kernels<T>());
  const DwCl<T> d(s);
  const int64_t taps = s.R * s.S + 1;  // + the bias sum
  // Sums in T over runs of rc output rows (parts = chunks per image), then in float64 in order.
  const int64_t rc = max64(1, kDwClSumPixels / max64(1, s.Q)), chunks = (s.P + rc - 1) / rc;
  const int64_t parts = s.N * chunks;
  std::vector<T> part(size_t(parts * d.blocks * taps * kDwClBlock));
  d.for_each_item([&](int64_t n, int64_t c0, int64_t cw, T* ws) {
    T *xb = ws, *yb = xb + d.xn;
    d.to_block(x.p + n * x.s[0] + c0 * x.s[1], x.s[1], x.s[2], x.s[3], s.H, s.W, s.ph, s.pw,
               d.dp.Hp, d.dp.Wp, cw, xb);
    d.to_block(dy.p + n * dy.s[0] + c0 * dy.s[1], dy.s[1], dy.s[2], dy.s[3], s.P, s.Q, 0, 0, s.P,
               s.Q, cw, yb);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      DwClGeom g = d.g;
      g.P = min64(rc, s.P - ch * rc);
      const int64_t p0 = ch * rc, i = (n * chunks + ch) * d.blocks + c0 / kDwClBlock;
      k.backward_weight(g, yb + p0 * s.Q * kDwClBlock, xb + p0 * s.sh * d.dp.Wp * kDwClBlock,
                        dbias != nullptr, part.data() + i * taps * kDwClBlock);
    }
  });
  parallel_for(s.C, 8, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t i = 0; i < (dbias ? taps : taps - 1); ++i) {
        double sum = 0;
        for (int64_t j = 0; j < parts; ++j)
          sum += double(part[size_t(((j * d.blocks + c / kDwClBlock) * taps + i) * kDwClBlock +
                                    c % kDwClBlock)]);
        if (i < taps - 1)
          dw.p[c * dw.s[0] + i / s.S * dw.s[2] + i % s.S * dw.s[3]] = T(sum);
        else
          dbias[c] = T(sum);
      }
  });
}

// -------------------------------------------------------------------------- small feature maps
// A map of fewer than kMergeBelow output pixels gives the per-image GEMMs too few columns (ResNet's
// 512-channel 2x2 maps: N = 4, and the weight gradient's K = 4), so the GEMM spends its time on
// packing and C traffic. All images' pixels become the GEMM's columns instead: column J = n*PQ + pq
// of [0, N*PQ), in chunks of at most kMergedCols. A TapTable maps each (tap, column) of a chunk to
// the input element under it (-1: padding) and each column to its output pixel, so im2col, col2im
// and the gathers of y / dy are plain indexed loops for any stride, padding and dilation.
//
//   forward          Yc (Kg x len) = W_g . col,       col packed from the table (or, stride 1,
//                    from zero-bordered image copies), Yc scattered to y
//   backward-data    dcol (CRS x len) = W_g^T . dYc,   col2im through the table (+=)
//   backward-weight  dW_g (Kg x CRS) (+)= dYc . col^T  (K = len pixels of every image at once)
constexpr int64_t kMergeBelow = 256;
constexpr int64_t kMergedCols = 2048;
// The weight gradient's im2col chunk (elements): large, as its pixels are the GEMM's K.
constexpr int64_t kMergedColBudget = int64_t(1) << 21;

inline bool merged(int64_t PQ) { return PQ < kMergeBelow; }

struct TapTable {
  int64_t J0 = 0, len = 0;  // merged columns [J0, J0 + len)
  // (R*S) x PQ: offset of x[img, 0, ih, iw] - img * xs[0] under tap (r, t) of pixel pq of any
  // image, or -1 (padding). One image's worth: a chunk's column J0 + j reads it at pixel
  // (J0 + j) % PQ, offset by image (J0 + j) / PQ (segments()). Building it per column instead
  // (9 x 4096 entries for the course CNN's first conv) cost more than that layer's GEMM.
  std::vector<int64_t> tap;
  std::vector<int64_t> pix;  // len: offset of y[n, 0, p, q] (in the strides of y / dy)
  // y / dy planes contiguous (q unit-stride, rows Q apart): a chunk is runs of whole or partial
  // planes, copied as such (table_rows).
  bool flat = false;
  int64_t PQ = 0, ys0 = 0, xs0 = 0;

  // taps: false when only the output pixels are needed (the stride-1 forward packs from
  // zero-bordered copies).
  TapTable(const Conv2dShape& s, const int64_t* xs, const int64_t* ys, int64_t j0, int64_t n,
           bool taps = true)
      : J0(j0),
        len(n),
        tap(taps ? size_t(s.R * s.S * s.P * s.Q) : 0),
        pix(size_t(n)),
        flat(ys[3] == 1 && (s.P <= 1 || ys[2] == s.Q)),
        PQ(s.P * s.Q),
        ys0(ys[0]),
        xs0(xs[0]) {
    // Column J0 + j is pixel (p, q) of image img, stepped without divisions.
    int64_t img = J0 / PQ, p = J0 % PQ / s.Q, q = J0 % s.Q;
    for (int64_t j = 0; j < n; ++j, ++q) {
      if (q == s.Q) q = 0, ++p;
      if (p == s.P) p = 0, ++img;
      pix[size_t(j)] = img * ys[0] + p * ys[2] + q * ys[3];
    }
    for (int64_t r = 0; r < (taps ? s.R : 0); ++r)
      for (int64_t t = 0; t < s.S; ++t)
        for (int64_t pp = 0; pp < s.P; ++pp) {
          const int64_t ih = pp * s.sh - s.ph + r * s.dh;
          for (int64_t qq = 0; qq < s.Q; ++qq) {
            const int64_t iw = qq * s.sw - s.pw + t * s.dw;
            const bool in = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
            tap[size_t((r * s.S + t) * PQ + pp * s.Q + qq)] = in ? ih * xs[2] + iw * xs[3] : -1;
          }
        }
  }

  // fn(k, xoff, pq, m) for the runs of chunk columns [j0, j0 + n) within one image: columns
  // j0 + k .. j0 + k + m - 1 are pixels pq .. pq + m - 1 of the image at x offset xoff.
  template <class F>
  void segments(int64_t j0, int64_t n, F&& fn) const {
    for (int64_t k = 0; k < n;) {
      const int64_t J = J0 + j0 + k, pq = J % PQ, m = min64(PQ - pq, n - k);
      fn(k, J / PQ * xs0, pq, m);
      k += m;
    }
  }
};

// out[j] = x[o[j]] (0 where o[j] < 0), j < n: one im2col row of a chunk.
template <class T>
NNK_CONV_INLINE void gather_taps(T* __restrict out, const T* __restrict x,
                                 const int64_t* __restrict o, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = o[j] >= 0 ? x[o[j]] : T(0);
}

// col (CRS x tt.len, row stride tt.len) of group g; kCol2Im: the adjoint, x[n]_g += col2im(col).
// Threads split the channels (disjoint in x, so col2im needs no atomics).
template <bool kCol2Im, class T>
void table_im2col(const Conv2dShape& s, const TapTable& tt,
                  std::conditional_t<kCol2Im, T*, const T*> x, int64_t xs1, int64_t g, int64_t Cg,
                  std::conditional_t<kCol2Im, const T*, T*> col, int nt) {
  const int64_t RS = s.R * s.S, ld = tt.len;
  parallel_for(
      Cg, 1,
      [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          auto* xc = x + (g * Cg + c) * xs1;
          for (int64_t rt = 0; rt < RS; ++rt) {
            const int64_t* o = tt.tap.data() + rt * tt.PQ;
            auto* row = col + (c * RS + rt) * ld;
            tt.segments(0, ld, [&](int64_t k, int64_t xoff, int64_t pq, int64_t m) {
              if constexpr (kCol2Im) {
                for (int64_t j = 0; j < m; ++j)
                  if (o[pq + j] >= 0) xc[xoff + o[pq + j]] += row[k + j];
              } else {
                gather_taps(row + k, xc + xoff, o + pq, m);
              }
            });
          }
        }
      },
      nt);
}

// buf (rows x len, row stride len) <-> a[pix[j] + (k0 + k) * rs] for k < rows: y / dy of a chunk.
template <bool kScatter, class T>
void table_rows(const TapTable& tt, std::conditional_t<kScatter, T*, const T*> a, int64_t rs,
                int64_t k0, int64_t rows, std::conditional_t<kScatter, const T*, T*> buf, int nt) {
  parallel_for(
      rows, 8,
      [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          auto* ak = a + (k0 + k) * rs;
          auto* bk = buf + k * tt.len;
          const int64_t* pix = tt.pix.data();
          if (tt.flat) {  // runs within one image's plane
            for (int64_t j = 0, J = tt.J0; j < tt.len;) {
              const int64_t run = min64(tt.PQ - J % tt.PQ, tt.len - j);
              auto* plane = ak + J / tt.PQ * tt.ys0 + J % tt.PQ;
              if constexpr (kScatter) {
                std::memcpy(plane, bk + j, size_t(run) * sizeof(T));
              } else {
                std::memcpy(bk + j, plane, size_t(run) * sizeof(T));
              }
              j += run;
              J += run;
            }
          } else if constexpr (kScatter) {
            for (int64_t j = 0; j < tt.len; ++j) ak[pix[j]] = bk[j];
          } else {
            for (int64_t j = 0; j < tt.len; ++j) bk[j] = ak[pix[j]];
          }
        }
      },
      nt);
}

// The forward GEMM's B for a chunk, packed straight from the table (Gemm::pack_b_fn).
template <class T>
struct TablePacker {
  const Conv2dShape* s;
  const TapTable* tt;
  const T* xg;  // x at channel 0 of the group
  int64_t xs1;

  static void pack(const void* ctx, int64_t p0, int64_t k, int64_t j0, int64_t ncols, int nr,
                   T* dst) {
    const TablePacker& tp = *static_cast<const TablePacker*>(ctx);
    const int64_t RS = tp.s->R * tp.s->S;
    alignas(64) T row[ColPacker<T>::kMaxCols];
    for (int64_t kk = 0; kk < k; ++kk) {
      const int64_t c = (p0 + kk) / RS, rt = (p0 + kk) % RS;
      const int64_t* o = tp.tt->tap.data() + rt * tp.tt->PQ;
      tp.tt->segments(j0, ncols, [&](int64_t k, int64_t xoff, int64_t pq, int64_t m) {
        gather_taps(row + k, tp.xg + c * tp.xs1 + xoff, o + pq, m);
      });
      row_to_panels(dst + kk * nr, row, ncols, nr, int64_t(nr) * k);
    }
  }
};

template <class T>
void forward_merged(const Conv2dShape& s, const Geometry<T>& gm, View4<const T> x, View4<const T> w,
                    const T* bias, View4<T> y) {
  const int nt = in_parallel_region() ? 1 : num_threads();
  const int64_t cols = s.N * gm.PQ, L = min64(cols, kMergedCols);
  // Packs from zero-bordered copies of the chunk's images (PaddedPacker: copies of whole runs),
  // or gathers through the table (TablePacker) past PaddedPacker's phase count.
  const bool padded = PaddedPacker<T>::ok(s);
  const int64_t Hp = PaddedPacker<T>::rows(s), Wp = PaddedPacker<T>::cols(s);
  const int64_t img = gm.Cg * PaddedPacker<T>::channel(s);
  const int64_t imgs = min64(s.N, (L + gm.PQ - 2) / gm.PQ + 1);  // a chunk touches at most these
  T* yc = thread_scratch<T>(Scratch::conv, size_t(gm.Kg * L + (padded ? imgs * img : 0)));
  T* xp = yc + gm.Kg * L;
  for (int64_t J0 = 0; J0 < cols; J0 += L) {
    const TapTable tt(s, x.s, y.s, J0, min64(L, cols - J0), !padded);
    const int64_t n0 = J0 / gm.PQ, n1 = (J0 + tt.len - 1) / gm.PQ + 1;
    for (int64_t g = 0; g < s.groups; ++g) {
      const TablePacker<T> packer{&s, &tt, x.p + g * gm.Cg * x.s[1], x.s[1]};
      const PaddedPacker<T> ppacker{&gm, xp, Hp, Wp, img, J0 - n0 * gm.PQ};
      if (padded) PaddedPacker<T>::fill_images(gm, x, n0, n1, g, xp, nt);
      Gemm<T> gg;
      gg.M = gm.Kg, gg.N = tt.len, gg.K = gm.CRS;
      gg.A = w.p + g * gm.Kg * w.s[0], gg.rsa = w.s[0], gg.csa = w.s[3];
      if (padded) {
        gg.pack_b_fn = &PaddedPacker<T>::pack, gg.pack_b_ctx = &ppacker;
      } else {
        gg.pack_b_fn = &TablePacker<T>::pack, gg.pack_b_ctx = &packer;
      }
      gg.C = yc, gg.rsc = tt.len, gg.csc = 1;
      gg.bias_m = bias ? bias + g * gm.Kg : nullptr;
      gemm(gg, nt);
      table_rows<true, T>(tt, y.p, y.s[1], g * gm.Kg, gm.Kg, yc, nt);
    }
  }
}

// fn(tt, g, dyc, col) for each chunk of L merged columns and each group: dyc = the chunk's dY_g
// gathered as (Kg x len), col = room for its (CRS x len) im2col. xs: strides of x (or dx).
template <class T, class F>
void for_each_dy_chunk(const Conv2dShape& s, const Geometry<T>& gm, const int64_t* xs,
                       View4<const T> dy, int64_t L, int nt, F&& fn) {
  T* dyc = thread_scratch<T>(Scratch::conv, size_t((gm.Kg + gm.CRS) * L));
  T* col = dyc + gm.Kg * L;
  for (int64_t J0 = 0, cols = s.N * gm.PQ; J0 < cols; J0 += L) {
    const TapTable tt(s, xs, dy.s, J0, min64(L, cols - J0));
    for (int64_t g = 0; g < s.groups; ++g) {
      table_rows<false, T>(tt, dy.p, dy.s[1], g * gm.Kg, gm.Kg, dyc, nt);
      fn(tt, g, static_cast<const T*>(dyc), col);
    }
  }
}

template <class T>
void backward_data_merged(const Conv2dShape& s, const Geometry<T>& gm, View4<const T> dy,
                          View4<const T> w, View4<T> dx) {
  const int nt = in_parallel_region() ? 1 : num_threads();
  const int64_t cols = s.N * gm.PQ, L = min64(cols, kMergedCols);
  parallel_for(
      s.N * s.C, 1,
      [&](int64_t b, int64_t e) {  // col2im accumulates: pixels no window touches stay zero
        for (int64_t i = b; i < e; ++i)
          for (int64_t h = 0; h < s.H; ++h)
            for (int64_t q = 0; q < s.W; ++q)
              dx.p[i / s.C * dx.s[0] + i % s.C * dx.s[1] + h * dx.s[2] + q * dx.s[3]] = T(0);
      },
      nt);
  for_each_dy_chunk(s, gm, dx.s, dy, L, nt,
                    [&](const TapTable& tt, int64_t g, const T* dyc, T* dcol) {
                      Gemm<T> gg;
                      gg.M = gm.CRS, gg.N = tt.len, gg.K = gm.Kg;
                      gg.A = w.p + g * gm.Kg * w.s[0], gg.rsa = w.s[3], gg.csa = w.s[0];
                      gg.B = dyc, gg.rsb = tt.len, gg.csb = 1;
                      gg.C = dcol, gg.rsc = tt.len, gg.csc = 1;
                      gemm(gg, nt);
                      table_im2col<true, T>(s, tt, dx.p, dx.s[1], g, gm.Cg, dcol, nt);
                    });
}

template <class T>
void backward_weight_merged(const Conv2dShape& s, const Geometry<T>& gm, View4<const T> x,
                            View4<const T> dy, View4<T> dw, T* dbias) {
  const int nt = in_parallel_region() ? 1 : num_threads();
  if (dbias) sum_channels(s.N, s.K, gm.PQ, dy.p, dy.s[0], dy.s[1], dy.s[3], dbias);
  if (gm.CRS == 0) return;
  const int64_t cols = s.N * gm.PQ;
  const int64_t L = min64(cols, max64(64, kMergedColBudget / gm.CRS));
  for_each_dy_chunk(s, gm, x.s, dy, L, nt,
                    [&](const TapTable& tt, int64_t g, const T* dyc, T* col) {
                      table_im2col<false, T>(s, tt, x.p, x.s[1], g, gm.Cg, col, nt);
                      // dW_g (Kg x CRS) = dYc (Kg x len) . col^T (len x CRS), accumulated over the
                      // chunks.
                      Gemm<T> gg;
                      gg.M = gm.Kg, gg.N = gm.CRS, gg.K = tt.len;
                      gg.A = dyc, gg.rsa = tt.len, gg.csa = 1;
                      gg.B = col, gg.rsb = 1, gg.csb = tt.len;
                      gg.C = dw.p + g * gm.Kg * dw.s[0], gg.rsc = dw.s[0], gg.csc = dw.s[3];
                      gg.beta = tt.J0 == 0 ? T(0) : T(1);
                      gemm(gg, nt);
                    });
}

// ----------------------------------------------------------------------- Winograd F(2x2, 3x3)
// 3x3 stride-1 undilated convolutions (and through the transposed forward, their data gradients)
// with enough channels and output pixels: each 2x2 output tile comes from a 4x4 input tile,
//   Y_tile = A^T [ sum_c (G g_kc G^T) .* (B^T d_c B) ] A
// so the 9 multiplies per output pixel and channel pair become 16 per 4 pixels (2.25x fewer),
// as 16 GEMMs (one per position xi of the 4x4 transform): M_xi (Kg x T) = U_xi (Kg x Cg) .
// V_xi (Cg x T) over the T tiles of every image. F(2x2, 3x3)'s transforms have entries 0, +-1 and
// +-1/2, so its float error stays close to the direct sum's (larger tiles, F(4x4, 3x3), lose too
// much float32 precision for the parity rule and are not used). The weight gradient is the
// adjoint of the same three steps. Tiles run in chunks that keep V and M near the caches. With
// fewer than 64 channels either way the 16 products are too skinny
// to gain (the course CNN's 64 -> 32 at 8x8 ran 10% slower than the direct GEMM); measured on the
// 2-vCPU Xeon against the direct path, forward, torch/ours: 128 ch 28x28 0.83 -> 1.25, 256 ch
// 14x14 0.72 -> 1.03, 64 ch 56x56 0.77 -> 0.91.
// Below 64 tiles the 16 products are too short (N = tiles) to gain over the direct GEMM: ResNet's
// 512 -> 512 at 7x7, batch 2 (32 tiles), torch/ours forward 0.76 / 0.78 -> 0.85 / 0.82, weight
// gradient 1.13 / 1.16 -> 1.42 / 1.34; 256 -> 256 at 4x4, batch 8, forward 0.80 -> 0.91 (at 98
// tiles, 256 -> 256 at 14x14, batch 2, Winograd still wins: 1.0 against 0.75-0.85 direct).
constexpr int64_t kWinogradMinTiles = 64;
constexpr int64_t kWinogradMinChannels = 64;
constexpr int64_t kWinogradBudget = int64_t(1) << 21;  // elements of V + M per chunk of rows
// Per-thread blocks (winograd_forward): bytes of one thread's V + M (the L2 of a Zen 4 / 5 core).
constexpr int64_t kWinogradBlockBytes = int64_t(1) << 20;

// min_channels: of the input and of the output channels per group (the weight gradient, whose
// GEMMs sum over the tiles, gains from 32 on: the course CNN's 64 -> 32 at 8x8, torch/ours 0.34 ->
// 0.48; 16 -> 16 at 16x16 lost, 0.93 -> 0.65).
inline bool winograd_ok(const Conv2dShape& s, int64_t min_channels = kWinogradMinChannels) {
  const int64_t tiles = s.N * ((s.P + 1) / 2) * ((s.Q + 1) / 2);
  return s.R == 3 && s.S == 3 && s.sh == 1 && s.sw == 1 && s.dh == 1 && s.dw == 1 &&
         s.C / s.groups >= min_channels && s.K / s.groups >= min_channels &&
         tiles >= kWinogradMinTiles;
}

// u (4x4, stride ld between the 16 positions) = G g G^T for a 3x3 g (strides gs2, gs3).
template <class T>
inline void winograd_filter(const T* g, int64_t gs2, int64_t gs3, T* u, int64_t ld) {
  T a[4][3];  // G g
  for (int j = 0; j < 3; ++j) {
    const T g0 = g[0 * gs2 + j * gs3], g1 = g[1 * gs2 + j * gs3], g2 = g[2 * gs2 + j * gs3];
    a[0][j] = g0;
    a[1][j] = T(0.5) * (g0 + g1 + g2);
    a[2][j] = T(0.5) * (g0 - g1 + g2);
    a[3][j] = g2;
  }
  for (int i = 0; i < 4; ++i) {
    const T g0 = a[i][0], g1 = a[i][1], g2 = a[i][2];
    u[(i * 4 + 0) * ld] = g0;
    u[(i * 4 + 1) * ld] = T(0.5) * (g0 + g1 + g2);
    u[(i * 4 + 2) * ld] = T(0.5) * (g0 - g1 + g2);
    u[(i * 4 + 3) * ld] = g2;
  }
}

// g (3x3, strides gs2, gs3) = G^T du G for the 16 positions of du (ld apart): the adjoint of
// winograd_filter.
template <class T>
inline void winograd_filter_grad(const T* du, int64_t ld, T* g, int64_t gs2, int64_t gs3) {
  T a[3][4];  // G^T du
  for (int j = 0; j < 4; ++j) {
    const T d0 = du[(0 * 4 + j) * ld], d1 = du[(1 * 4 + j) * ld], d2 = du[(2 * 4 + j) * ld],
            d3 = du[(3 * 4 + j) * ld];
    a[0][j] = d0 + T(0.5) * (d1 + d2);
    a[1][j] = T(0.5) * (d1 - d2);
    a[2][j] = T(0.5) * (d1 + d2) + d3;
  }
  for (int i = 0; i < 3; ++i) {
    g[i * gs2 + 0 * gs3] = a[i][0] + T(0.5) * (a[i][1] + a[i][2]);
    g[i * gs2 + 1 * gs3] = T(0.5) * (a[i][1] - a[i][2]);
    g[i * gs2 + 2 * gs3] = T(0.5) * (a[i][1] + a[i][2]) + a[i][3];
  }
}

// The transforms run a whole row of tiles at a time (the per-ISA row loops above), from the four
// zero-bordered input rows the tile row reads. Tile rows (n, ty) run in chunks of rc.
struct WinogradPlan {
  int64_t th, tw, rows, rc, ld, vld, mld, uld;
  WinogradPlan(const Conv2dShape& s, int64_t Cg, int64_t Kg, int64_t budget = kWinogradBudget)
      : th((s.P + 1) / 2), tw((s.Q + 1) / 2), rows(s.N * th) {
    rc = min64(rows, max64(1, budget / (16 * (Cg + Kg) * tw)));
    ld = 2 * tw + 2;  // columns of the input rows a tile row reads
    // The 16 planes of U, V and M are written / read together: planes a multiple of 4 KiB apart
    // would share L1 sets (16 streams in 12 ways), so they are padded.
    vld = plane(Cg * rc * tw), mld = plane(Kg * rc * tw), uld = plane(Kg * Cg);
  }
  static int64_t plane(int64_t n) { return (n + 15) / 16 * 16 + 16; }

  // This thread's U (or dU), V and M buffers.
  template <class T>
  void buffers(T** u, T** v, T** m) const {
    *u = thread_scratch<T>(Scratch::winograd_filter, size_t(16 * uld));
    *v = thread_scratch<T>(Scratch::conv, size_t(16 * (vld + mld)));
    *m = *v + 16 * vld;
  }
};

// V (16 x Cg x nr*tw, planes vld apart) = B^T d B for the tiles of tile rows [r0, r0 + nr) of
// group g, zero outside the image.
template <class T>
void winograd_input_tiles(const Conv2dShape& s, const Geometry<T>& gm, const WinogradPlan& wp,
                          View4<const T> x, int64_t g, int64_t r0, int64_t nr, T* v, int nt) {
  const ConvWinogradKernels<T>& wk = NNK_ISA_CALL(conv_winograd_kernels<T>());
  const int64_t tw = wp.tw, ld = wp.ld, tn = nr * tw;
  parallel_for(
      gm.Cg, 1,
      [&](int64_t c0, int64_t c1) {
        std::vector<T> buf(size_t(4 * ld));  // 4 input rows, from column -pw, zero-bordered
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t rr = 0; rr < nr; ++rr) {
            const int64_t n = (r0 + rr) / wp.th, ty = (r0 + rr) % wp.th;
            const T* xc = x.p + n * x.s[0] + (g * gm.Cg + c) * x.s[1];
            for (int i = 0; i < 4; ++i)
              padded_row(s, xc, x.s[2], x.s[3], 2 * ty - s.ph + i, buf.data() + i * ld, ld);
            wk.input_row(buf.data(), ld, tw, v + c * tn + rr * tw, wp.vld);
          }
      },
      nt);
}

// U (16 x Kg x Cg, planes uld apart) = G g G^T for group g's filters.
template <class T>
void winograd_filters(const Geometry<T>& gm, const WinogradPlan& wp, View4<const T> w, int64_t g,
                      T* u, int nt) {
  parallel_for(
      gm.Kg, 8,
      [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t c = 0; c < gm.Cg; ++c)
            winograd_filter(w.p + (g * gm.Kg + k) * w.s[0] + c * w.s[1], w.s[2], w.s[3],
                            u + k * gm.Cg + c, wp.uld);
      },
      nt);
}

// M_0 = U_0 . V_0 (Kg x tn = Kg x Cg . Cg x tn), the first of the forward's 16 products; the
// others are uld / vld / mld further on.
template <class T>
Gemm<T> winograd_product(const Geometry<T>& gm, int64_t tn, const T* u, const T* v, T* m) {
  Gemm<T> gg;
  gg.M = gm.Kg, gg.N = tn, gg.K = gm.Cg;
  gg.A = u, gg.rsa = gm.Cg, gg.csa = 1;
  gg.B = v, gg.rsb = tn, gg.csb = 1;
  gg.C = m, gg.rsc = tn, gg.csc = 1;
  return gg;
}

// Tile rows [r0, r0 + nr) of group g: V = B^T d B, M_xi = U_xi . V_xi for the 16 positions, then
// Y tiles = A^T M A (+ bias), cropped at odd P, Q. gemm_ws: nullptr, or (with nt == 1) room for
// gemm_workspace of one product.
template <class T>
void winograd_forward_rows(const Conv2dShape& s, const Geometry<T>& gm, const WinogradPlan& wp,
                           View4<const T> x, const T* u, int64_t g, int64_t r0, int64_t nr, T* v,
                           T* m, const T* bias, View4<T> y, int nt, T* gemm_ws) {
  const ConvWinogradKernels<T>& wk = NNK_ISA_CALL(conv_winograd_kernels<T>());
  const int64_t tw = wp.tw, mld = wp.mld, tn = nr * tw;
  winograd_input_tiles(s, gm, wp, x, g, r0, nr, v, nt);
  gemm_batched(winograd_product(gm, tn, u, v, m), 16, wp.uld, wp.vld, mld, nt, gemm_ws);
  parallel_for(
      gm.Kg, 1,
      [&](int64_t k0, int64_t k1) {
        std::vector<T> out(size_t(4 * tw));  // two output rows of 2 tw
        for (int64_t k = k0; k < k1; ++k) {
          const T b0 = bias ? bias[g * gm.Kg + k] : T(0);
          T* yg = y.p + (g * gm.Kg + k) * y.s[1];
          for (int64_t rr = 0; rr < nr; ++rr) {
            const int64_t n = (r0 + rr) / wp.th, p0 = 2 * ((r0 + rr) % wp.th);
            wk.output_row(m + k * tn + rr * tw, mld, tw, b0, out.data(), 2 * tw);
            for (int i = 0; i < 2 && p0 + i < s.P; ++i)
              copy_out(yg + n * y.s[0] + (p0 + i) * y.s[2], y.s[3], out.data() + i * 2 * tw, s.Q);
          }
        }
      },
      nt);
}

// Two schedules. When a block of tile rows whose V + M fit kWinogradBlockBytes leaves at least
// 4 blocks per thread (64 -> 64 channels at 56x56: 4 rows of 28 tiles, 1 MiB of float32), each
// thread runs whole blocks - input tiles, the 16 GEMMs single-threaded, output tiles - with V
// and M in its own buffer, which stays in its L2, and no barrier. Otherwise all threads share
// each larger chunk of rows step by step, V and M written by one thread and read by the other
// through L3. Interleaved A/B on the 2-vCPU Zen 4, 2 threads, forward torch/ours, three rounds:
// 3x3 64 -> 64 at 56x56 batch 2 1.09 / 0.76 / 0.76 -> 1.20 / 1.20 / 1.23x, batch 8 0.73 / 0.74 /
// 0.79 -> 1.15 / 1.16 / 1.18x, 128 -> 128 at 28x28 batch 8 1.00 / 1.01 / 1.00 -> 1.10 / 1.16 /
// 1.17x: the shared schedule slowed by a third while torch did not (this VM's L3 / memory
// bandwidth varies), the per-thread one did not.
template <class T>
void winograd_forward(const Conv2dShape& s, const Geometry<T>& gm, View4<const T> x,
                      View4<const T> w, const T* bias, View4<T> y) {
  const int nt = in_parallel_region() ? 1 : num_threads();
  const int64_t budget = kWinogradBlockBytes / int64_t(sizeof(T));
  const WinogradPlan blocks(s, gm.Cg, gm.Kg, budget);
  const bool per_thread = nt > 1 && 16 * (gm.Cg + gm.Kg) * blocks.tw <= budget &&
                          blocks.rows >= 4 * int64_t(nt) * blocks.rc;
  const WinogradPlan wp = per_thread ? blocks : WinogradPlan(s, gm.Cg, gm.Kg);
  T* u = thread_scratch<T>(Scratch::winograd_filter, size_t(16 * wp.uld));
  if (!per_thread) {
    T* v = thread_scratch<T>(Scratch::conv, size_t(16 * (wp.vld + wp.mld)));
    for (int64_t g = 0; g < s.groups; ++g) {
      winograd_filters(gm, wp, w, g, u, nt);
      for (int64_t r0 = 0; r0 < wp.rows; r0 += wp.rc)
        winograd_forward_rows(s, gm, wp, x, u, g, r0, min64(wp.rc, wp.rows - r0), v,
                              v + 16 * wp.vld, bias, y, nt, static_cast<T*>(nullptr));
    }
    return;
  }
  const Gemm<T> item = winograd_product<T>(gm, wp.rc * wp.tw, u, nullptr, nullptr);
  const size_t gws = per_thread_lines<T>(int64_t(gemm_workspace(item, 1)) + 1);
  const size_t per = per_thread_lines<T>(16 * (wp.vld + wp.mld)) + gws;
  T* ws = thread_scratch<T>(Scratch::conv, per * size_t(nt));
  const int64_t nblocks = (wp.rows + wp.rc - 1) / wp.rc;
  for (int64_t g = 0; g < s.groups; ++g) {
    winograd_filters(gm, wp, w, g, u, nt);
    parallel_for(
        nblocks, 1,
        [&](int64_t b0, int64_t b1) {
          T* v = ws + per * size_t(thread_id());
          T* m = v + 16 * wp.vld;
          T* gw = v + (per - gws);
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t r0 = b * wp.rc;
            winograd_forward_rows(s, gm, wp, x, u, g, r0, min64(wp.rc, wp.rows - r0), v, m, bias, y,
                                  1, gw);
          }
        },
        nt);
  }
}

// The weight gradient is the adjoint of the forward's three steps: per chunk of tiles,
//   dU_xi (Kg x Cg) += dM_xi (Kg x T) . V_xi^T (T x Cg),  dM = A dY_tile A^T,  V as forward,
// summed over the tiles of every image by the GEMMs (K = T), then dW = G^T dU G.
template <class T>
void winograd_backward_weight(const Conv2dShape& s, const Geometry<T>& gm, View4<const T> x,
                              View4<const T> dy, View4<T> dw, T* dbias) {
  const int nt = in_parallel_region() ? 1 : num_threads();
  if (dbias) sum_channels(s.N, s.K, gm.PQ, dy.p, dy.s[0], dy.s[1], dy.s[3], dbias);
  const WinogradPlan wp(s, gm.Cg, gm.Kg);
  const int64_t tw = wp.tw, mld = wp.mld;
  T *du, *v, *m;
  wp.buffers(&du, &v, &m);
  const ConvWinogradKernels<T>& wk = NNK_ISA_CALL(conv_winograd_kernels<T>());
  for (int64_t g = 0; g < s.groups; ++g) {
    for (int64_t r0 = 0; r0 < wp.rows; r0 += wp.rc) {
      const int64_t nr = min64(wp.rc, wp.rows - r0), tn = nr * tw;
      winograd_input_tiles(s, gm, wp, x, g, r0, nr, v, nt);
      // dM (16 x Kg x tn) from the 2x2 tiles of dy (zero past odd P, Q)
      parallel_for(
          gm.Kg, 1,
          [&](int64_t k0, int64_t k1) {
            std::vector<T> rows2(size_t(4 * tw), T(0));  // two dy rows of 2 tw
            for (int64_t k = k0; k < k1; ++k) {
              const T* dyk = dy.p + (g * gm.Kg + k) * dy.s[1];
              for (int64_t rr = 0; rr < nr; ++rr) {
                const int64_t n = (r0 + rr) / wp.th, p0 = 2 * ((r0 + rr) % wp.th);
                for (int i = 0; i < 2; ++i) {
                  T* d = rows2.data() + i * 2 * tw;
                  if (p0 + i < s.P)
                    copy_run(d, dyk + n * dy.s[0] + (p0 + i) * dy.s[2], s.Q, dy.s[3]);
                  else
                    std::fill(d, d + s.Q, T(0));
                }
                wk.grad_output_row(rows2.data(), 2 * tw, tw, m + k * tn + rr * tw, mld);
              }
            }
          },
          nt);
      // dU_xi (+)= dM_xi . V_xi^T
      Gemm<T> gg;
      gg.M = gm.Kg, gg.N = gm.Cg, gg.K = tn;
      gg.A = m, gg.rsa = tn, gg.csa = 1;
      gg.B = v, gg.rsb = 1, gg.csb = tn;
      gg.C = du, gg.rsc = gm.Cg, gg.csc = 1;
      gg.beta = r0 == 0 ? T(0) : T(1);
      gemm_batched(gg, 16, mld, wp.vld, wp.uld, nt);
    }
    // dW = G^T dU G
    parallel_for(
        gm.Kg, 8,
        [&](int64_t k0, int64_t k1) {
          for (int64_t k = k0; k < k1; ++k)
            for (int64_t c = 0; c < gm.Cg; ++c)
              winograd_filter_grad(du + k * gm.Cg + c, wp.uld,
                                   dw.p + (g * gm.Kg + k) * dw.s[0] + c * dw.s[1], dw.s[2],
                                   dw.s[3]);
        },
        nt);
  }
}

// -------------------------------------------------------------------------------- pixel rows
// With few output channels per group the merged GEMMs above have Kg rows, and every im2col
// element they pack serves only those Kg rows: at 64 -> 32 channels on 8x8 maps packing cost 2/3
// of the multiply. Turned around, output pixels are a GEMM dimension and nothing is packed:
//   forward          Y^T (pixels x Kg) = X~ (pixels x CRS) . W~^T (CRS x Kg)
//   backward-weight  dW~^T (CRS x Kg)  = X~^T (CRS x pixels) . dY^T (pixels x Kg)
// where X~[j, (rt, c)] = xcl[aoff[j] + koff[rt, c]]: xcl is a zero-padded channels-last copy of
// x, aoff[j] the window origin of output pixel j, koff the offset of tap rt, channel c from it.
// The GEMM reads X~ (or its transpose) in place through those two tables (Gemm::a_rows /
// a_cols); only W~ = the weight as (r, t, c) x k, or dY^T, is packed. Stride-1 data gradients
// reach the forward as the transposed convolution. Y^T goes back to NCHW a chunk at a time.
// Measured torch/ours on the 2-vCPU Xeon (2 threads), the course CNN's 64 -> 32 at 8x8, batch 64:
// forward 0.56 -> 0.88, data gradient 0.76 -> 0.96, weight gradient (against Winograd) 0.49 ->
// 0.70.
// Kg <= this (two B panels at most): at 128, the merged GEMMs' packing is amortised again
// (64 -> 128 3x3 stride 2 at 8x8 forward 0.87 -> 0.67, 128 -> 128 weight gradient at 8x8 against
// Winograd's 1.02 -> 0.60).
constexpr int64_t kPixelRowsMaxKg = 64;
constexpr int64_t kPixelRowsMinK = 64;  // CRS below it: C stores outweigh the products
// ... except for strided layers, whose im2col is a gather: MobileNetV2's 3 -> 32 3x3 stride-2 stem
// (CRS = 27) at 224x224 batch 2, torch/ours weight gradient 0.86 -> 1.12, at 64x64 batch 8 1.0 ->
// 1.3.
constexpr int64_t kPixelRowsMinKStrided = 24;
constexpr int64_t kPixelRowsBudget = 1 << 17;   // elements of one chunk's Y^T
constexpr int64_t kPixelRowsMaxCopy = 1 << 23;  // elements of the padded copy, larger maps

// Pointwise convolutions (1x1, stride 1, x flattenable) on maps of at least this many pixels run
// per image with x read in place as the GEMM's B, not merged or as pixel rows (which copy x):
// MobileNetV2's four 1x1 shapes at 14x14, batch 2, 1 thread, torch/ours summed over them,
// forward / data / weight gradient 0.65 / 0.76 / 0.69 -> 0.82 / 0.80 / 0.72 (at 7x7 per image
// lost: 960 -> 160 data gradient 0.93 -> 0.50).
constexpr int64_t kPointwisePerImage = 128;
template <class T>
bool pointwise_per_image(const Geometry<T>& gm, const View4<const T>& x) {
  return gm.pointwise_ok(x) && gm.PQ >= kPointwisePerImage;
}

template <class T>
bool pixel_rows_ok(const Conv2dShape& s, const Geometry<T>& gm) {
  // Windows that skip input rows or columns (1x1 stride 2) would copy pixels no tap reads; 1x1
  // layers on larger maps read x in place per image (measured slower here: 96 -> 24 1x1 at 56x56
  // forward 1.98 -> 0.99).
  const bool covers = s.sh <= (s.R - 1) * s.dh + 1 && s.sw <= (s.S - 1) * s.dw + 1;
  // Larger maps: only with at most 32 output channels (64 when strided) and a spatial kernel, and
  // a copy of at most kPixelRowsMaxCopy elements (MNIST's 64 -> 32 3x3 at 26x26, batch 64,
  // torch/ours forward 0.80 -> 0.95, weight gradient 0.81 -> 0.92; ResNet's 7x7 stride-2 stem,
  // 3 -> 64, whose im2col is a strided gather, at 224x224 batch 2 forward 0.89 -> 0.99, weight
  // gradient 0.66 -> 1.07, at 64x64 batch 8 0.72 -> 1.01 and 0.67 -> 1.03; at 64 output
  // channels stride 1 (VGG's 3 -> 64) even, and for 1x1 layers the per-image GEMMs stay faster).
  const DwPlane dp(s);  // the padded copy's extent: every window
  const bool strided = s.sh > 1 || s.sw > 1;
  const bool large_ok = (gm.Kg <= 32 || (gm.Kg <= 64 && strided)) && s.R * s.S > 1 &&
                        s.N * dp.Hp * dp.Wp * s.C <= kPixelRowsMaxCopy;
  return gm.Kg <= kPixelRowsMaxKg && gm.CRS >= (strided ? kPixelRowsMinKStrided : kPixelRowsMinK) &&
         covers && (merged(gm.PQ) || large_ok);
}

template <class T>
struct PixelRows {
  const Conv2dShape& s;
  const Geometry<T>& gm;
  const int64_t Hp, Wp;  // the padded copy: rows -ph .. -ph + Hp - 1, columns -pw .. -pw + Wp - 1
  const decltype(GemmUKernel<T>::transpose) transpose;
  std::vector<int64_t> koff;  // CRS: column (rt, c) of X~

  PixelRows(const Conv2dShape& sh, const Geometry<T>& g)
      : s(sh),
        gm(g),
        Hp(DwPlane(sh).Hp),
        Wp(DwPlane(sh).Wp),
        transpose(active_gemm_ukernel<T>().transpose),
        koff(static_cast<size_t>(g.CRS)) {
    for (int64_t k = 0; k < gm.CRS; ++k) {
      const int64_t rt = k / gm.Cg, c = k % gm.Cg;
      koff[size_t(k)] = (rt / s.S * s.dh * Wp + rt % s.S * s.dw) * s.C + c;
    }
  }

  // xcl[(((n - n0) * Hp + h) * Wp + v) * C + c] = x[n, c, h - ph, v - pw] (0 outside) for images
  // n0 <= n < n1, threads over the (n, h) rows.
  void fill(View4<const T> x, int64_t n0, int64_t n1, T* xcl, int nt) const {
    parallel_for((n1 - n0) * Hp, 1,
                 [&](int64_t b, int64_t e) {
                   for (int64_t i = b; i < e;) {  // the rows of one image at a time
                     const int64_t n = i / Hp, end = min64(e, (n + 1) * Hp);
                     channels_last_rows(transpose, x.p + (n0 + n) * x.s[0], x.s[1], x.s[2], x.s[3],
                                        s.H, s.W, s.ph, s.pw, Wp, i - n * Hp, end - n * Hp, s.C,
                                        s.C, xcl + n * Hp * Wp * s.C);
                     i = end;
                   }
                 },
                 nt);
  }

  // aoff[j] = window origin of output pixel J0 + j, j < len, stepped without divisions.
  void origins(int64_t J0, int64_t len, int64_t* aoff) const {
    for (int64_t j = 0, n = J0 / gm.PQ, p = J0 % gm.PQ / s.Q, q = J0 % s.Q; j < len; ++j) {
      aoff[j] = ((n * Hp + p * s.sh) * Wp + q * s.sw) * s.C;
      if (++q == s.Q) {
        q = 0;
        if (++p == s.P) p = 0, ++n;
      }
    }
  }

  // kToNchw: a[n, k, p, q] = t[j * K + k] for the chunk's pixels J0 + j (else the reverse):
  // per image in the chunk, its run of pixels transposed to / from the K planes (contiguous
  // planes), or element by element; threads split the channels.
  template <bool kToNchw>
  void pixels(std::conditional_t<kToNchw, View4<T>, View4<const T>> a, int64_t J0, int64_t len,
              std::conditional_t<kToNchw, const T*, T*> t, int nt) const {
    const int64_t K = s.K;
    const bool flat = a.s[3] == 1 && (s.P <= 1 || a.s[2] == s.Q);
    parallel_for(
        K, 8,
        [&](int64_t k0, int64_t k1) {
          for (int64_t j = 0, J = J0; j < len;) {
            const int64_t n = J / gm.PQ, pq = J % gm.PQ, run = min64(gm.PQ - pq, len - j);
            auto* ak = a.p + n * a.s[0] + k0 * a.s[1];
            if (flat) {
              if constexpr (kToNchw)
                transpose(run, k1 - k0, t + j * K + k0, K, ak + pq, a.s[1]);
              else
                transpose(k1 - k0, run, ak + pq, a.s[1], t + j * K + k0, K);
            } else {
              for (int64_t k = k0; k < k1; ++k)
                for (int64_t e = 0; e < run; ++e) {
                  auto& v =
                      ak[(k - k0) * a.s[1] + (pq + e) / s.Q * a.s[2] + (pq + e) % s.Q * a.s[3]];
                  if constexpr (kToNchw)
                    v = t[(j + e) * K + k];
                  else
                    t[(j + e) * K + k] = v;
                }
            }
            j += run;
            J += run;
          }
        },
        nt);
  }

  // kToW: w[g * Kg + k, c, r, t] = wk[(rt * Cg + c) * K + g * Kg + k] (else the reverse): the
  // weight as the (CRS x K) operand of every group side by side, or its gradient back.
  template <bool kToW>
  void weight(std::conditional_t<kToW, View4<T>, View4<const T>> w,
              std::conditional_t<kToW, const T*, T*> wk) const {
    for (int64_t g = 0; g < s.groups; ++g)
      for (int64_t k = 0; k < gm.Kg; ++k)
        for (int64_t c = 0; c < gm.Cg; ++c)
          for (int64_t rt = 0; rt < s.R * s.S; ++rt) {
            auto& v =
                w.p[(g * gm.Kg + k) * w.s[0] + c * w.s[1] + rt / s.S * w.s[2] + rt % s.S * w.s[3]];
            auto& u = wk[(rt * gm.Cg + c) * s.K + g * gm.Kg + k];
            if constexpr (kToW)
              v = u;
            else
              u = v;
          }
  }
};

// Work of one pixel-rows pass, in blocks of whole images. With images to spare (split_for) each
// thread takes its own blocks and runs every step for them alone: the padded copy of the block's
// images, single-threaded GEMMs and the transposes back, with no barrier between the steps and
// the block's copy still in its caches (on one thread the blocks run one by one). Otherwise one
// block holds every image and each step uses all threads. Inside a block, chunks of at most L
// pixels (their transposed output, tk, is L x K). Measured torch/ours on the 2-vCPU Xeon, threads
// per step -> per block, two interleaved A/B runs: 64 -> 32 at 8x8, batch 64, 2 threads, forward
// 0.86 / 0.88 -> 0.88 / 0.86, data gradient (the transposed forward) 1.02 / 0.77 -> 1.25 / 1.29,
// weight gradient 0.63 / 0.68 -> 0.89 / 0.82; MNIST's 32 -> 32 at 26x26, forward 0.94 -> 1.07,
// weight gradient 0.79 -> 1.19 (1 thread: 0.76 -> 1.20); 64 -> 32 at 32x32, batch 8, forward
// 0.80 -> 1.04, weight gradient 0.80 -> 1.16.
constexpr int64_t kPixelRowsBlock = 512;  // output pixels per block of images, at least one image

template <class T>
struct PixelRowsPass : PixelRows<T> {
  Split sp;
  int gemm_nt;              // threads per step (and GEMM)
  int64_t imgs, blocks, L;  // images per block, blocks, pixels per chunk
  size_t xblock, tkn;       // elements per worker: the block's padded copy, tk
  size_t per = 0;           // elements per worker in all (with the caller's extra)
  T *wk = nullptr, *shared = nullptr, *ws = nullptr;  // see allocate()
  std::vector<int64_t> aoff;                          // L window origins per worker

  PixelRowsPass(const Conv2dShape& sh, const Geometry<T>& g) : PixelRows<T>(sh, g) {
    const int nt = in_parallel_region() ? 1 : num_threads();
    // At least 4 blocks per thread where the images allow (balance on a busy machine).
    imgs = max64(1, min64(kPixelRowsBlock / max64(1, g.PQ), sh.N / (4 * int64_t(nt))));
    blocks = (sh.N + imgs - 1) / imgs;
    sp = split_for(blocks);
    if (!sp.images && sp.nt > 1) imgs = sh.N, blocks = 1;  // one thread: blocks one by one
    gemm_nt = sp.gemm_nt;
    L = min64(imgs * g.PQ, max64(256, kPixelRowsBudget / sh.K));
    xblock = per_thread_lines<T>(imgs * this->Hp * this->Wp * sh.C);
    tkn = per_thread_lines<T>(L * sh.K);
  }
  size_t workers() const { return sp.images ? size_t(sp.nt) : 1; }
  // The chunk lengths any GEMM sees: L, and the tails of a full and of the last block.
  std::vector<int64_t> lens() const {
    const int64_t full = imgs * this->gm.PQ, last = (this->s.N - (blocks - 1) * imgs) * this->gm.PQ;
    std::vector<int64_t> v{L};
    for (int64_t n : {full, last})
      if (n % L) v.push_back(n % L);
    return v;
  }
  // Scratch: wk (CRS x K), `shared_elems` for the caller, then per worker its xcl, tk and
  // `extra_elems` for the caller (GEMM workspace, partial sums).
  void allocate(size_t shared_elems, size_t extra_elems) {
    const size_t wn = per_thread_lines<T>(this->gm.CRS * this->s.K);
    shared_elems = per_thread_lines<T>(int64_t(shared_elems));
    per = xblock + tkn + per_thread_lines<T>(int64_t(extra_elems));
    wk = thread_scratch<T>(Scratch::conv, wn + shared_elems + per * workers() + 1);
    shared = wk + wn;
    ws = shared + shared_elems;
    aoff.resize(size_t(L) * workers());
  }

  // Worker w's `extra_elems` (after its xcl and tk).
  T* extra_of(size_t w) const { return ws + per * w + xblock + tkn; }

  // fn(tid, J0, len, xcl, aoff, tk, extra) for each chunk of pixels [J0, J0 + len): xcl the
  // padded copy of its block (aoff relative to it), tk and extra worker tid's.
  template <class F>
  void run(View4<const T> x, F&& fn) {
    for_each_image(blocks, sp, ws, per, [&](int64_t blk, int tid, T* mine) {
      const int64_t n0 = blk * imgs, n1 = min64(this->s.N, n0 + imgs);
      int64_t* ao = aoff.data() + size_t(L) * size_t(tid);
      this->fill(x, n0, n1, mine, gemm_nt);
      for (int64_t j = 0, pixels = (n1 - n0) * this->gm.PQ; j < pixels; j += L) {
        const int64_t len = min64(L, pixels - j);
        this->origins(j, len, ao);
        fn(tid, n0 * this->gm.PQ + j, len, mine, ao, mine + xblock, extra_of(size_t(tid)));
      }
    });
  }
};

template <class T>
void forward_pixel_rows(const Conv2dShape& s, const Geometry<T>& gm, View4<const T> x,
                        View4<const T> w, const T* bias, View4<T> y) {
  PixelRowsPass<T> pr(s, gm);
  // Y^T (len x Kg) = X~ (len x CRS) . wk_g, wk_g packed once for every chunk.
  const size_t packed = gemm_packed_b_size<T>(gm.CRS, gm.Kg);
  auto product = [&](int64_t len, const T* xcl, const int64_t* ao, const T* pb, T* tk, int64_t g) {
    Gemm<T> gg;
    gg.M = len, gg.N = gm.Kg, gg.K = gm.CRS;
    gg.A = xcl + g * gm.Cg;
    gg.a_rows = ao, gg.a_cols = pr.koff.data();
    gg.packed_b = pb + size_t(g) * packed;
    gg.C = tk + g * gm.Kg, gg.rsc = s.K, gg.csc = 1;
    gg.bias_n = bias ? bias + g * gm.Kg : nullptr;
    return gg;
  };
  size_t gws = 0;
  for (int64_t len : pr.lens())
    gws = std::max(gws,
                   gemm_workspace(product(len, x.p, pr.koff.data(), x.p, nullptr, 0), pr.gemm_nt));
  pr.allocate(packed * size_t(s.groups), gws);
  pr.template weight<false>(w, pr.wk);
  for (int64_t g = 0; g < s.groups; ++g)
    gemm_pack_b(gm.CRS, gm.Kg, pr.wk + g * gm.Kg, s.K, 1, pr.shared + size_t(g) * packed, pr.sp.nt);
  pr.run(x, [&](int, int64_t J0, int64_t len, const T* xcl, const int64_t* ao, T* tk, T* gemm_ws) {
    for (int64_t g = 0; g < s.groups; ++g)
      gemm(product(len, xcl, ao, pr.shared, tk, g), pr.gemm_nt, gemm_ws);
    pr.template pixels<true>(y, J0, len, tk, pr.gemm_nt);
  });
}

template <class T>
void backward_weight_pixel_rows(const Conv2dShape& s, const Geometry<T>& gm, View4<const T> x,
                                View4<const T> dy, View4<T> dw, T* dbias) {
  if (dbias) sum_channels(s.N, s.K, gm.PQ, dy.p, dy.s[0], dy.s[1], dy.s[3], dbias);
  PixelRowsPass<T> pr(s, gm);
  // Per worker: its partial sum dwk (CRS x K), (+)= X~^T (CRS x len) . dY^T (len x Kg) per group.
  const size_t part = size_t(gm.CRS * s.K);
  auto product = [&](int64_t len, const T* xcl, const int64_t* ao, const T* tk, T* dwk, int64_t g,
                     bool first) {
    Gemm<T> gg;
    gg.M = gm.CRS, gg.N = gm.Kg, gg.K = len;
    gg.A = xcl + g * gm.Cg;
    gg.a_rows = pr.koff.data(), gg.a_cols = ao;
    gg.B = tk + g * gm.Kg, gg.rsb = s.K, gg.csb = 1;
    gg.C = dwk + g * gm.Kg, gg.rsc = s.K, gg.csc = 1;
    gg.beta = first ? T(0) : T(1);
    return gg;
  };
  size_t gws = 0;
  for (int64_t len : pr.lens())
    gws = std::max(
        gws, gemm_workspace(product(len, x.p, pr.koff.data(), x.p, nullptr, 0, true), pr.gemm_nt));
  pr.allocate(0, per_thread_lines<T>(int64_t(part)) + gws);
  std::vector<char> used(pr.workers(), 0);  // partials that hold a sum
  pr.run(x, [&](int tid, int64_t J0, int64_t len, const T* xcl, const int64_t* ao, T* tk, T* ex) {
    T* gemm_ws = ex + per_thread_lines<T>(int64_t(part));  // after the partial sum, dwk = ex
    pr.template pixels<false>(dy, J0, len, tk, pr.gemm_nt);
    for (int64_t g = 0; g < s.groups; ++g)
      gemm(product(len, xcl, ao, tk, ex, g, !used[size_t(tid)]), pr.gemm_nt, gemm_ws);
    used[size_t(tid)] = 1;
  });
  // wk = the partials, added in worker order (zero when there were no pixels).
  parallel_for(
      int64_t(part), 1024,
      [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          T acc = T(0);
          for (size_t t = 0; t < used.size(); ++t)
            if (used[t]) acc += pr.extra_of(t)[i];
          pr.wk[i] = acc;
        }
      },
      pr.sp.nt);
  pr.template weight<true>(dw, pr.wk);
}

// ------------------------------------------------------------------------------------ forward

template <class T>
void forward(const Conv2dShape& s, View4<const T> x, View4<const T> w, const T* bias, View4<T> y) {
  const Geometry<T> gm(s);
  if (s.N == 0 || s.K == 0 || gm.PQ == 0) return;
  if (depthwise_cl_ok(s)) return depthwise_cl_forward(s, x, w, bias, y);
  if (is_depthwise(s)) return depthwise_forward(s, x, w, bias, y);
  if (winograd_ok(s)) return winograd_forward(s, gm, x, w, bias, y);
  const bool own = pointwise_per_image(gm, x);
  if (!own && pixel_rows_ok(s, gm)) return forward_pixel_rows(s, gm, x, w, bias, y);
  if (!own && merged(gm.PQ)) return forward_merged(s, gm, x, w, bias, y);
  const bool pw = gm.pointwise_ok(x);
  const Split sp = split_for(s.N);

  // A = W_g (Kg x CRS), B = col (CRS x PQ) packed by ColPacker, or x[n]_g in place (pointwise),
  // C = Y[n]_g (Kg x PQ).
  Gemm<T> shape;
  shape.M = gm.Kg;
  shape.N = gm.PQ;
  shape.K = gm.CRS;
  shape.rsa = w.s[0];
  shape.csa = w.s[3];
  shape.rsc = y.s[1];
  shape.csc = y.s[3];
  // im2col from zero-bordered copies of the image (PaddedPacker); ColPacker past its phases.
  const bool padded = !pw && PaddedPacker<T>::ok(s);
  const int64_t Hp = PaddedPacker<T>::rows(s), Wp = PaddedPacker<T>::cols(s);
  const size_t xp_elems = padded ? size_t(gm.Cg * PaddedPacker<T>::channel(s)) : 0;
  if (pw) {
    shape.rsb = x.s[1];
    shape.csb = x.s[3];
  } else {
    shape.pack_b_fn = padded ? &PaddedPacker<T>::pack : &ColPacker<T>::pack;
  }
  const size_t gws = gemm_workspace(shape, sp.gemm_nt);

  T* ws = image_scratch<T>(sp, xp_elems + gws);
  for_each_image(s.N, sp, ws, xp_elems + gws, [&](int64_t n, int, T* scratch) {
    T* xp = scratch;
    T* gemm_ws = scratch + xp_elems;
    for (int64_t g = 0; g < s.groups; ++g) {
      const ColPacker<T> packer{&gm, x.p, x.s, n, g};
      const PaddedPacker<T> ppacker{&gm, xp, Hp, Wp, 0, 0};
      Gemm<T> gg = shape;
      gg.A = w.p + g * gm.Kg * w.s[0];
      if (pw) {
        gg.B = x.p + n * x.s[0] + g * gm.Cg * x.s[1];
      } else if (padded) {
        PaddedPacker<T>::fill(gm, x, n, g, xp, sp.gemm_nt);
        gg.pack_b_ctx = &ppacker;
      } else {
        gg.pack_b_ctx = &packer;
      }
      gg.C = y.p + n * y.s[0] + g * gm.Kg * y.s[1];
      gg.bias_m = bias ? bias + g * gm.Kg : nullptr;
      gemm(gg, sp.gemm_nt, gemm_ws);
    }
  });
}

// ------------------------------------------------------------------------------ backward data

template <class T>
void backward_data(const Conv2dShape& s, View4<const T> dy, View4<const T> w, View4<T> dx) {
  const Geometry<T> gm(s);
  if (s.N == 0 || s.C == 0) return;
  if (depthwise_cl_ok(s)) return depthwise_cl_backward_data(s, dy, w, dx);
  if (is_depthwise(s)) return depthwise_backward_data(s, dy, w, dx);
  // The transposed forward's GEMM has Cg rows: with fewer than ~16 it only packs, col2im is
  // faster (C = 1 first layers, depthwise). On small maps it also transposes the weight
  // (C x Kg x R x S) where merged col2im scatters C x R x S x N*PQ: the smaller of the two.
  const bool transposed = s.sh == 1 && s.sw == 1 && gm.Cg >= 16;
  const View4<const T> dxc{dx.p, {dx.s[0], dx.s[1], dx.s[2], dx.s[3]}};
  if (merged(gm.PQ) && !(transposed && gm.Kg <= s.N * gm.PQ) && !pointwise_per_image(gm, dxc))
    return backward_data_merged(s, gm, dy, w, dx);
  if (transposed) {
    // dx[c, h, w] = sum_{k, r, t} w[k, c, r, t] dy[k, h + ph - r dh, w + pw - t dw]: a stride-1
    // forward convolution of dy (K channels, P x Q) with w~[c, k, r', t'] = w[k, c, R-1-r',
    // S-1-t'] per group, padded by (R-1) dh - ph on top and (S-1) dw - pw on the left (negative
    // crops), producing H x W. One code path (and its speed) for both directions.
    Conv2dShape t = s;
    t.C = s.K;
    t.H = s.P;
    t.W = s.Q;
    t.K = s.C;
    t.P = s.H;
    t.Q = s.W;
    t.ph = (s.R - 1) * s.dh - s.ph;
    t.pw = (s.S - 1) * s.dw - s.pw;
    if (s.groups == 1 && winograd_ok(t)) {
      // Winograd reads its weight with any strides: w~ is a view of w (dims swapped, taps
      // reversed), no copy.
      const View4<const T> wv{w.p + (s.R - 1) * w.s[2] + (s.S - 1) * w.s[3],
                              {w.s[1], w.s[0], -w.s[2], -w.s[3]}};
      return winograd_forward<T>(t, Geometry<T>(t), dy, wv, nullptr, dx);
    }
    const int64_t RS = s.R * s.S;
    T* wt = thread_scratch<T>(Scratch::conv_weight, size_t(s.C * gm.Kg * RS) + 1);
    for (int64_t g = 0; g < s.groups; ++g)
      for (int64_t c = 0; c < gm.Cg; ++c)
        for (int64_t k = 0; k < gm.Kg; ++k)
          for (int64_t r = 0; r < s.R; ++r)
            for (int64_t u = 0; u < s.S; ++u)
              wt[(((g * gm.Cg + c) * gm.Kg + k) * s.R + r) * s.S + u] =
                  w.p[(g * gm.Kg + k) * w.s[0] + c * w.s[1] + (s.R - 1 - r) * w.s[2] +
                      (s.S - 1 - u) * w.s[3]];
    forward<T>(t, dy, View4<const T>{wt, {gm.Kg * RS, RS, s.S, 1}}, nullptr, dx);
    return;
  }
  const bool pw = gm.pointwise_ok(dxc) && gm.Kg > 0;
  const Split sp = split_for(s.N);
  const int64_t L = pw ? gm.PQ : max64(gm.L, 1), last = pw ? gm.PQ : gm.PQ - (gm.PQ - 1) / L * L;

  // A = W_g^T (CRS x Kg), B = dY[n]_g (Kg x len), C = dcol (CRS x len) or dX[n]_g (pointwise).
  Gemm<T> shape;
  shape.M = gm.CRS;
  shape.K = gm.Kg;
  shape.rsa = w.s[3];
  shape.csa = w.s[0];
  shape.rsb = dy.s[1];
  shape.csb = dy.s[3];
  shape.rsc = pw ? dx.s[1] : L;
  shape.csc = pw ? dx.s[3] : 1;
  const size_t col = pw ? 0 : size_t(gm.CRS * L);
  const size_t gws = gm.PQ ? gemm_scratch(shape, sp.gemm_nt, L, last) : 0;

  T* ws = image_scratch<T>(sp, col + gws);
  for_each_image(s.N, sp, ws, col + gws, [&](int64_t n, int, T* scratch) {
    T* dcol = scratch;
    T* gemm_ws = scratch + col;
    for (int64_t g = 0; g < s.groups; ++g) {
      T* dxg = dx.p + n * dx.s[0] + g * gm.Cg * dx.s[1];
      if (!pw) {  // col2im accumulates: start from zero (pixels no window touches stay zero)
        for (int64_t c = 0; c < gm.Cg; ++c)
          for (int64_t h = 0; h < s.H; ++h)
            for (int64_t x = 0; x < s.W; ++x) dxg[c * dx.s[1] + h * dx.s[2] + x * dx.s[3]] = T(0);
      }
      for (int64_t j0 = 0; j0 < gm.PQ; j0 += L) {
        const int64_t len = min64(L, gm.PQ - j0);
        Gemm<T> gg = shape;
        gg.N = len;
        gg.A = w.p + g * gm.Kg * w.s[0];
        gg.B = dy.p + n * dy.s[0] + g * gm.Kg * dy.s[1] + j0 * dy.s[3];
        gg.C = pw ? dxg : dcol;
        gemm(gg, sp.gemm_nt, gemm_ws);
        if (!pw) gm.template im2col<true>(dx.p, dx.s, n, g, j0, len, dcol, L);
      }
    }
  });
}

// ---------------------------------------------------------------------------- backward weight

template <class T>
void backward_weight(const Conv2dShape& s, View4<const T> x, View4<const T> dy, View4<T> dw,
                     T* dbias) {
  const Geometry<T> gm(s);
  if (s.K == 0) return;
  if (depthwise_cl_ok(s)) return depthwise_cl_backward_weight(s, x, dy, dw, dbias);
  if (is_depthwise(s)) return depthwise_backward_weight(s, x, dy, dw, dbias);
  // Pixel rows before Winograd below 64 output channels (the course CNN's 64 -> 32 at 8x8: 0.49
  // -> 0.70), after it at 64 (64 -> 64 at 8x8: 1.01 -> 0.91).
  const bool own = pointwise_per_image(gm, x);
  const bool pixel_rows = !own && pixel_rows_ok(s, gm);
  if (pixel_rows && gm.Kg < kWinogradMinChannels)
    return backward_weight_pixel_rows(s, gm, x, dy, dw, dbias);
  if (winograd_ok(s, 32)) return winograd_backward_weight(s, gm, x, dy, dw, dbias);
  if (pixel_rows) return backward_weight_pixel_rows(s, gm, x, dy, dw, dbias);
  if (!own && merged(gm.PQ)) return backward_weight_merged(s, gm, x, dy, dw, dbias);
  const bool pw = gm.pointwise_ok(x);
  // The bias gradient rides along as one more column of B, a row of ones under col: the GEMM
  // then also writes sum_pixels dY[k] (no second pass over dY). Pointwise reads x in place, so
  // there it is a separate channel sum.
  const bool fused_bias = dbias && !pw;
  if (dbias && !fused_bias) sum_channels(s.N, s.K, gm.PQ, dy.p, dy.s[0], dy.s[1], dy.s[3], dbias);
  if (gm.CRS == 0 && !fused_bias) return;
  // Work items are (image, chunk of output pixels): im2col and the GEMMs of any batch size,
  // a single large image included, spread over the threads with per-thread partial sums. (Small
  // images ran with merged columns above.)
  const int64_t ld = gm.CRS + (fused_bias ? 1 : 0);  // rows of the (ld x K) partial sums
  const int64_t L = pw ? gm.PQ : max64(gm.L, 1);     // pixels per item (the col row stride)
  const int64_t chunks = gm.PQ ? (gm.PQ + L - 1) / L : 0;
  const int64_t last = pw ? gm.PQ : gm.PQ - (gm.PQ - 1) / L * L;
  const int64_t items = s.N * chunks;
  const Split sp = split_for(items);

  // Per item and group, with col = [im2col; 1] (ld x len) or X[n]_g (pointwise) and dY[n]_g
  // (Kg x len), one of two orientations:
  //   wide col (ld >= 4 Kg):  partial_g^T (ld x Kg) += col . dY^T   A = col, read in place (its
  //                           rows are contiguous pixels); only the small dY^T is packed
  //   otherwise:              partial_g (Kg x ld)   += dY . col^T   (few input channels: col^T is
  //                           small, and dY's long rows make the better A)
  // (With col^T packed for 64 -> 32 channels at 8x8 the pass ran 2.7x slower than torch: packing
  // col^T is a strided gather of every element.) Partials are one per thread (one shared by the
  // GEMM's threads when images run one at a time), added in thread order at the end.
  const bool wide = ld >= 4 * gm.Kg;
  const size_t col = pw ? 0 : size_t(ld * L);
  const size_t part = size_t(s.K * ld);
  // The product for `len` pixels of col (element (j, p) at c + j*cs + p*cp) and dY (element (k, p)
  // at d + k*ds + p*dp), accumulated into the partial of group g.
  auto product = [&](int64_t len, const T* c, int64_t cs, int64_t cp, const T* d, int64_t ds,
                     int64_t dp, T* partial, int64_t g) {
    Gemm<T> gg;
    gg.K = len;
    gg.beta = T(1);
    gg.csc = 1;
    if (wide) {
      gg.M = ld, gg.N = gm.Kg;
      gg.A = c, gg.rsa = cs, gg.csa = cp;
      gg.B = d, gg.rsb = dp, gg.csb = ds;
      gg.C = partial + g * gm.Kg, gg.rsc = s.K;
    } else {
      gg.M = gm.Kg, gg.N = ld;
      gg.A = d, gg.rsa = ds, gg.csa = dp;
      gg.B = c, gg.rsb = cp, gg.csb = cs;
      gg.C = partial + g * gm.Kg * ld, gg.rsc = ld;
    }
    return gg;
  };
  size_t gws = 0;
  if (gm.PQ) {  // the largest workspace any item's GEMM asks for (strides as in the loop)
    const int64_t cs = pw ? x.s[1] : L, cp = pw ? x.s[3] : 1;
    for (int64_t len : {L, last})
      gws = std::max(gws,
                     gemm_workspace(product(len, x.p, cs, cp, dy.p, dy.s[1], dy.s[3], nullptr, 0),
                                    sp.gemm_nt));
  }
  const size_t per = col + part + gws;
  const int nparts = sp.images ? sp.nt : 1;
  std::vector<char> used(size_t(nparts), 0);  // partials that hold a sum

  T* ws = image_scratch<T>(sp, per);
  for_each_image(items, sp, ws, per, [&](int64_t item, int tid, T* scratch) {
    T* colbuf = scratch;
    T* mine = scratch + col;
    T* gemm_ws = scratch + col + part;
    if (!used[size_t(tid)]) {
      std::fill(mine, mine + part, T(0));
      used[size_t(tid)] = 1;
    }
    const int64_t n = item / chunks, j0 = item % chunks * L, len = min64(L, gm.PQ - j0);
    for (int64_t g = 0; g < s.groups; ++g) {
      const T* d = dy.p + n * dy.s[0] + g * gm.Kg * dy.s[1] + j0 * dy.s[3];
      if (pw) {
        const T* xg = x.p + n * x.s[0] + g * gm.Cg * x.s[1];
        gemm(product(len, xg, x.s[1], x.s[3], d, dy.s[1], dy.s[3], mine, g), sp.gemm_nt, gemm_ws);
      } else {
        gm.template im2col<false>(x.p, x.s, n, g, j0, len, colbuf, L);
        if (fused_bias) std::fill(colbuf + gm.CRS * L, colbuf + gm.CRS * L + len, T(1));
        gemm(product(len, colbuf, L, 1, d, dy.s[1], dy.s[3], mine, g), sp.gemm_nt, gemm_ws);
      }
    }
  });

  // dw (and dbias) = the partials, added in thread order (zero when there were no images).
  parallel_for(s.K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t j = 0; j < ld; ++j) {
        const size_t at = col + size_t(wide ? j * s.K + k : k * ld + j);
        T acc = T(0);
        for (int t = 0; t < nparts; ++t)
          if (used[size_t(t)]) acc += ws[per * t + at];
        if (j < gm.CRS)
          dw.p[k * dw.s[0] + j * dw.s[3]] = acc;
        else
          dbias[k] = acc;
      }
    }
  });
}

// ------------------------------------------------------------------------------- entry points

Conv2dShape shape_of(const Conv2dArgs& a) {
  Conv2dShape s;
  s.N = a.N, s.C = a.C, s.H = a.H, s.W = a.W, s.K = a.K, s.R = a.R, s.S = a.S, s.P = a.P, s.Q = a.Q;
  s.sh = a.sh, s.sw = a.sw, s.ph = a.ph, s.pw = a.pw, s.dh = a.dh, s.dw = a.dw;
  s.groups = a.groups;
  return s;
}

template <class T>
View4<T> view4(T* p, const int64_t* st) {
  return View4<T>{p, {st[0], st[1], st[2], st[3]}};
}

// ----------------------------------------------------------------------------------- bfloat16
// bfloat16 x, w, bias and y (raw 16-bit words), float32 accumulation, each result rounded once:
//   forward          Y_g (Kg x L)   = W_g (Kg x CRS) . col (CRS x L), bias in the store
//   backward-data    dcol (CRS x L) = W_g^T (CRS x Kg) . dY_g (Kg x L) in float32, col2im into a
//                    float32 copy of dx, rounded when its images are done
//   backward-weight  dW_g (Kg x CRS) += dY_g (Kg x L) . col^T (L x CRS) in float32, rounded at the
//   end
// on cpu::gemm_bf16 (AMX, AVX512_BF16, or widening to float32 where the CPU has neither), over
// chunks of L output columns of the merged column space J = n * PQ + pixel: a piece of one image
// when an image fills a chunk (Y / dY are then read and written in place), else whole images side
// by side (Y / dY through a buffer). col is im2col in bfloat16 (Geometry::im2col_row). Depthwise
// layers, whose GEMMs would have one row, run the float32 kernels on float32 copies instead
// (widen_bf16).
// Which path a pass takes: depthwise -> float32 copies; C/groups a multiple of 32 -> pixel runs
// (below: no im2col) for the forward when the maps have enough pixels (runs_pay), for the weight
// gradient always, for the stride-1 data gradient as the flipped forward (one group); everything
// else -> the im2col GEMMs here, the strided data gradient through col2im.

// im2col of one chunk: about CRS x L <= 2^20 bfloat16 values (2 MiB), L at least 256.
constexpr int64_t kBf16ColBudget = int64_t(1) << 20;

struct Bf16Chunks {
  int64_t PQ, imgs, L;  // images per block (their columns one chunk when imgs > 1)
  Bf16Chunks(const Conv2dShape& s, int64_t CRS) : PQ(s.P * s.Q) {
    const int64_t want = max64(256, kBf16ColBudget / max64(CRS, 1) / 32 * 32);
    imgs = PQ >= want ? 1 : max64(1, min64(s.N, want / max64(PQ, 1)));
    L = imgs > 1 ? imgs * PQ : want;
  }
  // body(n0, nb, J0, len) for the chunks of images [n0, n0 + nb), then done(n0, nb) per block.
  template <class Body, class Done>
  void run(int64_t N, Body body, Done done) const {
    for (int64_t n0 = 0; n0 < N; n0 += imgs) {
      const int64_t nb = min64(imgs, N - n0), end = (n0 + nb) * PQ;
      for (int64_t J0 = n0 * PQ; J0 < end; J0 += L) body(n0, nb, J0, min64(L, end - J0));
      done(n0, nb);
    }
  }
};

// f(n, pixel, count, offset) for the pieces of columns [J0, J0 + len) that lie in one image.
template <class F>
void image_pieces(int64_t PQ, int64_t J0, int64_t len, F f) {
  for (int64_t J = J0; J < J0 + len;) {
    const int64_t n = J / PQ, pix = J % PQ, m = min64(PQ - pix, J0 + len - J);
    f(n, pix, m, J - J0);
    J += m;
  }
}

// Element stride between consecutive pixels of a (N, C, P, Q) view whose pixels flatten.
inline int64_t pixel_stride(const int64_t* st, int64_t Q) { return Q > 1 ? st[3] : st[2]; }
// Element stride along the flattened (C/groups, R, S) of a weight view.
inline int64_t crs_stride(const Conv2dShape& s, const int64_t* ws) {
  return s.S > 1 ? ws[3] : s.R > 1 ? ws[2] : ws[1];
}

// buf (rows x len) <-> channels [ch0, ch0 + rows) of an activation (y or dy) over columns
// [J0, J0 + len); kToBuf gathers, else scatters.
template <bool kToBuf>
void move_chunk(std::conditional_t<kToBuf, const uint16_t*, uint16_t*> act, const int64_t* st,
                int64_t Q, int64_t PQ, int64_t ch0, int64_t rows, int64_t J0, int64_t len,
                std::conditional_t<kToBuf, uint16_t*, const uint16_t*> buf) {
  const int64_t ps = pixel_stride(st, Q);
  parallel_for(rows, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      image_pieces(PQ, J0, len, [&](int64_t n, int64_t pix, int64_t m, int64_t off) {
        const int64_t at = n * st[0] + (ch0 + r) * st[1] + pix * ps;
        if constexpr (kToBuf)
          copy_run(buf + r * len + off, act + at, m, ps);
        else
          copy_out(act + at, ps, buf + r * len + off, m);
      });
  });
}

// col (CRS x len) = im2col of x's group g over columns [J0, J0 + len).
void im2col_bf16(const Geometry<uint16_t>& gm, const uint16_t* x, const int64_t* xs, int64_t g,
                 int64_t J0, int64_t len, uint16_t* col) {
  const Conv2dShape& s = gm.s;
  parallel_for(gm.CRS, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t c = row / (s.R * s.S), r = row / s.S % s.R, t = row % s.S;
      image_pieces(gm.PQ, J0, len, [&](int64_t n, int64_t pix, int64_t m, int64_t off) {
        gm.im2col_row<false>(x, xs, n, g, c, r, t, pix, m, col + row * len + off);
      });
    }
  });
}

// acc (images n0.., contiguous (nb, C, H, W) float32) += col2im of dcol (CRS x len), group g.
void col2im_f32(const Geometry<float>& gm, float* acc, int64_t n0, int64_t g, int64_t J0,
                int64_t len, const float* dcol) {
  const Conv2dShape& s = gm.s;
  const int64_t accs[4] = {s.C * s.H * s.W, s.H * s.W, s.W, 1};
  parallel_for(gm.Cg, 1, [&](int64_t c0, int64_t c1) {  // rows of one channel add to one plane
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t r = 0; r < s.R; ++r)
        for (int64_t t = 0; t < s.S; ++t) {
          const float* row = dcol + ((c * s.R + r) * s.S + t) * len;
          image_pieces(gm.PQ, J0, len, [&](int64_t n, int64_t pix, int64_t m, int64_t off) {
            gm.im2col_row<true>(acc, accs, n - n0, g, c, r, t, pix, m, row + off);
          });
        }
  });
}

// Contiguous float32 copy of a 4-D bfloat16 view of `shape` (the depthwise passes' operands).
void widen4(const uint16_t* src, const int64_t* st, const int64_t* shape, float* dst) {
  const int64_t planes = shape[0] * shape[1], hw = shape[2] * shape[3];
  parallel_for(planes, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const uint16_t* p = src + i / shape[1] * st[0] + i % shape[1] * st[1];
      for (int64_t h = 0; h < shape[2]; ++h)
        bf16_to_f32_n(p + h * st[2], dst + i * hw + h * shape[3], shape[3], st[3]);
    }
  });
}

// dst (a 4-D bfloat16 view of `shape`) = src (contiguous float32) rounded.
void narrow4(const float* src, const int64_t* shape, uint16_t* dst, const int64_t* st) {
  const int64_t planes = shape[0] * shape[1], hw = shape[2] * shape[3];
  parallel_for(planes, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      uint16_t* p = dst + i / shape[1] * st[0] + i % shape[1] * st[1];
      for (int64_t h = 0; h < shape[2]; ++h)
        f32_to_bf16_n(src + i * hw + h * shape[3], p + h * st[2], shape[3], st[3]);
    }
  });
}

// Layers the bfloat16 passes run as float32 kernels on float32 copies: depthwise (one-row GEMMs).
// (Also sending C/groups R S < 32 layers there, a C = 1 first layer, was slower: the copies of
// their outputs cost more than the float32 kernels gained; MNIST conv1 forward 0.59 -> 1.45 ms.)
inline bool widen_bf16(const Conv2dShape& s) { return is_depthwise(s); }

// Float32 working copies of a pass's three operands (contiguous NCHW), carved from one scratch
// buffer: the passes of widen_bf16 layers run the float32 kernels on them.
struct WideConv {
  Conv2dArgs a;  // the pass's geometry with the copies' strides
  float *x, *w, *y;
  explicit WideConv(const Conv2dArgs& args) : a(args) {
    const int64_t xn[4] = {a.N, a.C, a.H, a.W}, wn[4] = {a.K, a.Cg, a.R, a.S};
    const int64_t yn[4] = {a.N, a.K, a.P, a.Q};
    for (auto [st, n] : {std::pair{a.xs, xn}, std::pair{a.ws, wn}, std::pair{a.ys, yn}}) {
      st[3] = 1, st[2] = n[3], st[1] = n[2] * n[3], st[0] = n[1] * n[2] * n[3];
    }
    const size_t nx = size_t(a.N * a.C * a.H * a.W), nw = size_t(a.K * a.Cg * a.R * a.S);
    const size_t ny = size_t(a.N * a.K * a.P * a.Q);
    x = thread_scratch<float>(Scratch::conv_bf16, nx + nw + ny);
    w = x + nx, y = w + nw;
  }
};

// Pixel runs (C / groups a multiple of 32): the GEMMs read the windows of zero-padded
// channels-last copies of a block of images in place (GemmBf16::a_rows / b_rows): output pixel
// i's window starts at xp + rows[i], its tap (r, t) and 32 channels from 32 cb at + runs[(r S + t)
// Cg / 32 + cb]. No im2col: the copies are the padded images (the input's size), the weight in
// (R, S, C/groups, K) order (forward), and Y / dY through a buffer where NCHW images are merged.
//   forward          Y^T (pixels x Kg)   = X~ (pixels x RS Cg) . W~_g^T (RS Cg x Kg)
//   backward-weight  dW~_g (Kg x RS Cg) += dY_g (Kg x pixels) . X~ (pixels x RS Cg)
inline bool runs_ok(const Conv2dShape& s) { return s.C > 0 && (s.C / s.groups) % 32 == 0; }
// The forward through runs transposes the whole weight: on maps with fewer pixels in all than
// half the output channels (ResNet's 512 channels at 2 x 2: 0.47 ms against 0.79) the im2col
// path, which reads the weight in place as its A, moves less. (The data gradient's flipped view
// takes runs at any size: there the transpose reads the weight in its own order.)
inline bool runs_pay(const Conv2dShape& s) {
  return runs_ok(s) && 2 * s.N * s.P * s.Q >= s.K / s.groups;
}

// Elements of the padded copies of one block of images (about 4 MiB of bfloat16).
constexpr int64_t kRunsBudget = int64_t(1) << 21;

struct RunsPlan {
  const Conv2dShape& s;
  int64_t Cg, RSC, PQ, Hp, Wp, img, nb;  // img: elements of one padded image; nb per block
  std::vector<int64_t> runs;
  RunsPlan(const Conv2dShape& sh, bool merge) : s(sh) {
    Cg = s.C / s.groups, RSC = s.R * s.S * Cg, PQ = s.P * s.Q;
    Hp = (s.P - 1) * s.sh + (s.R - 1) * s.dh + 1;  // padded rows every window covers
    Wp = (s.Q - 1) * s.sw + (s.S - 1) * s.dw + 1;
    img = Hp * Wp * s.C;
    nb = merge ? max64(1, min64(s.N, kRunsBudget / max64(img, 1))) : 1;
    for (int64_t r = 0; r < s.R; ++r)
      for (int64_t t = 0; t < s.S; ++t)
        for (int64_t cb = 0; cb < Cg; cb += 32)
          runs.push_back((r * s.dh * Wp + t * s.dw) * s.C + cb);
  }
  // rows[i] for the pixels of nb images, padded to a multiple of 32 with 0.
  void rows(int64_t* out) const {
    const int64_t M = nb * PQ, M32 = (M + 31) / 32 * 32;
    for (int64_t i = 0; i < M32; ++i) {
      const int64_t n = i / PQ, p = i % PQ / s.Q, q = i % s.Q;
      out[i] = i < M ? n * img + (p * s.sh * Wp + q * s.sw) * s.C : 0;
    }
  }
  // xp = padded channels-last copies of images [n0, n0 + cnt) of x: xp[n][h][w][c] =
  // x[n0 + n, c, h - ph, w - pw], zero outside x.
  void fill(const uint16_t* x, const int64_t* xs, int64_t n0, int64_t cnt, uint16_t* xp) const {
    const int64_t lo = max64(0, s.pw), hi = min64(Wp, s.pw + s.W);  // columns inside x
    parallel_for(cnt * Hp, 8, [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        uint16_t* d = xp + row * Wp * s.C;
        const int64_t n = n0 + row / Hp, ih = row % Hp - s.ph;
        if (ih < 0 || ih >= s.H || hi <= lo) {
          std::fill(d, d + Wp * s.C, uint16_t(0));
          continue;
        }
        std::fill(d, d + lo * s.C, uint16_t(0));
        std::fill(d + hi * s.C, d + Wp * s.C, uint16_t(0));
        const uint16_t* src = x + n * xs[0] + ih * xs[2] + (lo - s.pw) * xs[3];
        if (xs[1] == 1) {
          for (int64_t v = lo; v < hi; ++v)
            std::memcpy(d + v * s.C, src + (v - lo) * xs[3], size_t(s.C) * 2);
        } else {
          for (int64_t c = 0; c < s.C; ++c)
            for (int64_t v = lo; v < hi; ++v) d[v * s.C + c] = src[c * xs[1] + (v - lo) * xs[3]];
        }
      }
    });
  }
};

// wt (R, S, C/groups, K) = a weight view with strides ws, transposed: the runs GEMMs' B, row-major
// (kk = (r S + t) Cg + c, column k), so that it packs two rows at a time or is read in place. In
// 32 x 32 tiles of (c, k): both the plain weight (k strided) and the flipped view of the data
// gradient (c strided) then read and write whole cache lines.
void permute_weight(const Conv2dShape& s, const uint16_t* w, const int64_t* ws, uint16_t* wt) {
  const int64_t Cg = s.C / s.groups, RS = s.R * s.S;
  constexpr int64_t kT = 32;
  const int64_t kt = (s.K + kT - 1) / kT, ct = (Cg + kT - 1) / kT;
  parallel_for(RS * ct * kt, 1, [&](int64_t b, int64_t e) {
    for (int64_t tile = b; tile < e; ++tile) {
      const int64_t rt = tile / (ct * kt), c0 = tile / kt % ct * kT, k0 = tile % kt * kT;
      const uint16_t* src = w + rt / s.S * ws[2] + rt % s.S * ws[3];
      for (int64_t c = c0; c < min64(Cg, c0 + kT); ++c) {
        uint16_t* d = wt + (rt * Cg + c) * s.K;
        for (int64_t k = k0; k < min64(s.K, k0 + kT); ++k) d[k] = src[k * ws[0] + c * ws[1]];
      }
    }
  });
}

// Whether the pixels of every image of a (N, K, P, Q) view share one stride (channels_last), so
// that merged images are one GEMM operand in place.
inline bool uniform_pixels(const Conv2dShape& s, const int64_t* st) {
  return s.N <= 1 || st[0] == s.P * s.Q * pixel_stride(st, s.Q);
}

// The scratch of a runs pass (one block of images at a time): the pixel rows, the padded copies,
// the Y / dY buffer of merged NCHW images, and `floats` more float32 values.
struct RunsPass {
  RunsPlan pl;
  int64_t Kg, ps;
  bool in_place;  // Y / dY read and written in place (channels_last, or NCHW image by image)
  int64_t* rows;
  uint16_t *xp, *buf;
  float* extra;
  RunsPass(const Conv2dArgs& a, const Conv2dShape& s, size_t floats)
      : pl(s, uniform_pixels(s, a.ys) || s.P * s.Q < 256),  // NCHW 256+ pixels: image by image
        Kg(s.K / s.groups),
        ps(pixel_stride(a.ys, s.Q)),
        in_place(uniform_pixels(s, a.ys) || pl.nb == 1) {
    const int64_t M32 = (pl.nb * pl.PQ + 31) / 32 * 32;
    const size_t xp_n = size_t(pl.nb * pl.img), buf_n = in_place ? 0 : size_t(pl.nb * pl.PQ * Kg);
    rows = static_cast<int64_t*>(
        thread_scratch(Scratch::conv_bf16, size_t(M32) * 8 + floats * 4 + (xp_n + buf_n) * 2 + 64));
    extra = reinterpret_cast<float*>(rows + M32);
    xp = reinterpret_cast<uint16_t*>(extra + floats);
    buf = xp + xp_n;
    pl.rows(rows);
  }
  // fn(n0, cnt) for each block of images [n0, n0 + cnt) of x, its padded copies in xp.
  template <class F>
  void each_block(const uint16_t* x, const int64_t* xs, F&& fn) const {
    for (int64_t n0 = 0; n0 < pl.s.N; n0 += pl.nb) {
      const int64_t cnt = min64(pl.nb, pl.s.N - n0);
      pl.fill(x, xs, n0, cnt, xp);
      fn(n0, cnt);
    }
  }
};

void forward_runs(const Conv2dArgs& a, const uint16_t* x, const uint16_t* w, const float* bias,
                  uint16_t* y) {
  const Conv2dShape s = shape_of(a);
  const RunsPass rp(a, s, 0);
  const RunsPlan& pl = rp.pl;
  uint16_t* wt = thread_scratch<uint16_t>(Scratch::conv_bf16_weight, size_t(s.K * pl.RSC));
  permute_weight(s, w, a.ws, wt);
  rp.each_block(x, a.xs, [&](int64_t n0, int64_t cnt) {
    for (int64_t g = 0; g < s.groups; ++g) {
      GemmBf16 gg;
      gg.M = cnt * pl.PQ, gg.N = rp.Kg, gg.K = pl.RSC;
      gg.A = rp.xp + g * pl.Cg, gg.a_rows = rp.rows, gg.a_runs = pl.runs.data();
      gg.B = wt + g * rp.Kg, gg.rsb = s.K, gg.csb = 1;
      if (rp.in_place) {
        gg.C = y + n0 * a.ys[0] + g * rp.Kg * a.ys[1], gg.rsc = rp.ps, gg.csc = a.ys[1];
      } else {  // Y_g (Kg x pixels), stored transposed, then copied out by channel
        gg.C = rp.buf, gg.rsc = 1, gg.csc = gg.M;
      }
      gg.c_bf16 = true;
      gg.bias_n = bias ? bias + g * rp.Kg : nullptr;
      gemm_bf16(gg);
      if (!rp.in_place)
        move_chunk<false>(y, a.ys, s.Q, pl.PQ, g * rp.Kg, rp.Kg, n0 * pl.PQ, gg.M, rp.buf);
    }
  });
}

void backward_weight_runs(const Conv2dArgs& a, const uint16_t* x, const uint16_t* dy,
                          uint16_t* dw) {
  const Conv2dShape s = shape_of(a);
  const RunsPass rp(a, s, size_t(s.K * (s.C / s.groups) * s.R * s.S));
  const RunsPlan& pl = rp.pl;
  float* dw32 = rp.extra;  // (K, R, S, C/groups) order
  rp.each_block(x, a.xs, [&](int64_t n0, int64_t cnt) {
    for (int64_t g = 0; g < s.groups; ++g) {
      GemmBf16 gg;
      gg.M = rp.Kg, gg.N = pl.RSC, gg.K = cnt * pl.PQ;
      if (rp.in_place) {
        gg.A = dy + n0 * a.ys[0] + g * rp.Kg * a.ys[1], gg.rsa = a.ys[1], gg.csa = rp.ps;
      } else {  // dY_g (Kg x pixels) gathered by channel
        move_chunk<true>(dy, a.ys, s.Q, pl.PQ, g * rp.Kg, rp.Kg, n0 * pl.PQ, gg.K, rp.buf);
        gg.A = rp.buf, gg.rsa = gg.K, gg.csa = 1;
      }
      gg.B = rp.xp + g * pl.Cg, gg.b_rows = rp.rows, gg.b_runs = pl.runs.data();
      gg.C = dw32 + g * rp.Kg * pl.RSC, gg.rsc = pl.RSC, gg.csc = 1;
      gg.beta = n0 > 0 ? 1.f : 0.f;
      gemm_bf16(gg);
    }
  });
  parallel_for(s.K, 4, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t r = 0; r < s.R; ++r)
        for (int64_t t = 0; t < s.S; ++t) {
          const float* src = dw32 + ((k * s.R + r) * s.S + t) * pl.Cg;
          f32_to_bf16_n(src, dw + k * a.ws[0] + r * a.ws[2] + t * a.ws[3], pl.Cg, a.ws[1]);
        }
  });
}

void forward_bf16(const Conv2dArgs& a, const uint16_t* x, const uint16_t* w, const uint16_t* bias,
                  uint16_t* y) {
  const Conv2dShape s = shape_of(a);
  const Geometry<uint16_t> gm(s);
  if (s.N == 0 || s.K == 0 || gm.PQ == 0) return;
  const int64_t yshape[4] = {s.N, s.K, s.P, s.Q};
  std::vector<float> b32(bias ? size_t(s.K) : 0);
  if (bias) bf16_to_f32_n(bias, b32.data(), s.K);
  const float* bf = bias ? b32.data() : nullptr;
  if (widen_bf16(s)) {
    const WideConv wc(a);
    const int64_t xshape[4] = {s.N, s.C, s.H, s.W}, wshape[4] = {s.K, gm.Cg, s.R, s.S};
    widen4(x, a.xs, xshape, wc.x);
    widen4(w, a.ws, wshape, wc.w);
    forward<float>(shape_of(wc.a), view4<const float>(wc.x, wc.a.xs),
                   view4<const float>(wc.w, wc.a.ws), bf, view4(wc.y, wc.a.ys));
    return narrow4(wc.y, yshape, y, a.ys);
  }
  if (runs_pay(s)) return forward_runs(a, x, w, bf, y);
  const Bf16Chunks ch(s, gm.CRS);
  const int64_t wcrs = crs_stride(s, a.ws), ps = pixel_stride(a.ys, s.Q);
  uint16_t* col = thread_scratch<uint16_t>(Scratch::conv_bf16, size_t((gm.CRS + gm.Kg) * ch.L));
  uint16_t* ybuf = col + gm.CRS * ch.L;
  ch.run(
      s.N,
      [&](int64_t n0, int64_t nb, int64_t J0, int64_t len) {
        for (int64_t g = 0; g < s.groups; ++g) {
          GemmBf16 gg;
          gg.M = gm.Kg, gg.N = len, gg.K = gm.CRS;
          gg.A = w + g * gm.Kg * a.ws[0], gg.rsa = a.ws[0], gg.csa = wcrs;
          if (gm.CRS > 0) im2col_bf16(gm, x, a.xs, g, J0, len, col);
          gg.B = col, gg.rsb = len, gg.csb = 1;
          if (nb == 1) {  // in place: row k of Y_g is channel g*Kg + k of image n0
            gg.C = y + n0 * a.ys[0] + g * gm.Kg * a.ys[1] + (J0 - n0 * gm.PQ) * ps;
            gg.rsc = a.ys[1], gg.csc = ps;
          } else {
            gg.C = ybuf, gg.rsc = len, gg.csc = 1;
          }
          gg.c_bf16 = true;
          gg.bias_m = bias ? b32.data() + g * gm.Kg : nullptr;
          gemm_bf16(gg);
          if (nb > 1) move_chunk<false>(y, a.ys, s.Q, gm.PQ, g * gm.Kg, gm.Kg, J0, len, ybuf);
        }
      },
      [](int64_t, int64_t) {});
}

void backward_data_bf16(const Conv2dArgs& a, const uint16_t* dy, const uint16_t* w, uint16_t* dx) {
  const Conv2dShape s = shape_of(a);
  const Geometry<float> gm(s);
  if (s.N == 0 || s.C == 0) return;
  const int64_t xshape[4] = {s.N, s.C, s.H, s.W};
  if (gm.PQ == 0 || s.K == 0) {  // no window: dx = 0
    parallel_for(s.N * s.C, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        for (int64_t h = 0; h < s.H; ++h)
          for (int64_t q = 0; q < s.W; ++q)
            dx[i / s.C * a.xs[0] + i % s.C * a.xs[1] + h * a.xs[2] + q * a.xs[3]] = 0;
    });
    return;
  }
  if (widen_bf16(s)) {
    const WideConv wc(a);
    const int64_t wshape[4] = {s.K, gm.Cg, s.R, s.S}, yshape[4] = {s.N, s.K, s.P, s.Q};
    widen4(dy, a.ys, yshape, wc.y);
    widen4(w, a.ws, wshape, wc.w);
    backward_data<float>(shape_of(wc.a), view4<const float>(wc.y, wc.a.ys),
                         view4<const float>(wc.w, wc.a.ws), view4(wc.x, wc.a.xs));
    return narrow4(wc.x, xshape, dx, a.xs);
  }
  // Stride 1: the forward of dy with the flipped, channel-transposed weight w~[c, k, r', t'] =
  // w[k, c, R-1-r', S-1-t'] per group, padded by (R-1) dh - ph and (S-1) dw - pw (negative
  // crops), as the float32 pass does: no col2im, and one GEMM shape for both directions. With
  // pixel runs and one group w~ is a view of w (the runs path copies it once, in its order).
  Conv2dArgs t = a;
  t.C = a.K, t.H = a.P, t.W = a.Q, t.K = a.C, t.P = a.H, t.Q = a.W;
  t.Cg = a.Kg, t.Kg = a.Cg;
  t.ph = (a.R - 1) * a.dh - a.ph, t.pw = (a.S - 1) * a.dw - a.pw;
  for (int d = 0; d < 4; ++d) t.xs[d] = a.ys[d], t.ys[d] = a.xs[d];
  const bool view = s.groups == 1 && runs_ok(shape_of(t));
  // (Otherwise on maps with fewer pixels in all than output channels, col2im's scatter of
  // C R S x N P Q is cheaper than transposing the K x C R S weight.)
  if (s.sh == 1 && s.sw == 1 && (view || (gm.Cg >= 16 && gm.Kg <= s.N * gm.PQ))) {
    if (view) {
      const int64_t vs[4] = {a.ws[1], a.ws[0], -a.ws[2], -a.ws[3]};
      for (int d = 0; d < 4; ++d) t.ws[d] = vs[d];
      return forward_runs(t, dy, w + (a.R - 1) * a.ws[2] + (a.S - 1) * a.ws[3], nullptr, dx);
    }
    const int64_t RS = s.R * s.S;
    uint16_t* wt = thread_scratch<uint16_t>(Scratch::conv_weight, size_t(s.C * gm.Kg * RS) + 1);
    // In 16 x 16 blocks of (c, k), so that both sides move whole runs of taps.
    constexpr int64_t kB = 16;
    parallel_for((s.C + kB - 1) / kB, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t cb = b0 * kB; cb < min64(s.C, b1 * kB); cb += kB)
        for (int64_t kb = 0; kb < gm.Kg; kb += kB)
          for (int64_t gc = cb; gc < min64(s.C, cb + kB); ++gc) {  // gc = g * Cg + c
            const uint16_t* src = w + (gc / gm.Cg * gm.Kg + kb) * a.ws[0] + gc % gm.Cg * a.ws[1] +
                                  (s.R - 1) * a.ws[2] + (s.S - 1) * a.ws[3];
            uint16_t* dst = wt + (gc * gm.Kg + kb) * RS;
            for (int64_t k = kb; k < min64(gm.Kg, kb + kB); ++k, src += a.ws[0])
              for (int64_t r = 0; r < s.R; ++r)
                for (int64_t u = 0; u < s.S; ++u) *dst++ = src[-r * a.ws[2] - u * a.ws[3]];
          }
    });
    const int64_t wts[4] = {gm.Kg * RS, RS, s.S, 1};
    for (int d = 0; d < 4; ++d) t.ws[d] = wts[d];
    return forward_bf16(t, dy, wt, nullptr, dx);
  }
  const Bf16Chunks ch(s, gm.CRS);
  const int64_t wcrs = crs_stride(s, a.ws), ps = pixel_stride(a.ys, s.Q), img = s.C * s.H * s.W;
  // acc: the float32 dx of one block of images; dcol (CRS x L) float32; dybuf (Kg x L).
  const size_t acc_n = size_t(ch.imgs * img), dcol_n = size_t(gm.CRS * ch.L);
  float* acc =
      thread_scratch<float>(Scratch::conv_bf16, acc_n + dcol_n + size_t(gm.Kg * ch.L + 1) / 2 + 16);
  float* dcol = acc + acc_n;
  uint16_t* dybuf = reinterpret_cast<uint16_t*>(dcol + dcol_n);
  ch.run(
      s.N,
      [&](int64_t n0, int64_t nb, int64_t J0, int64_t len) {
        if (J0 == n0 * gm.PQ)
          parallel_for(nb * img, 1 << 14, [&](int64_t b, int64_t e) {
            std::fill(acc + b, acc + e, 0.f);  // pixels no window covers stay zero
          });
        for (int64_t g = 0; g < s.groups; ++g) {
          GemmBf16 gg;
          gg.M = gm.CRS, gg.N = len, gg.K = gm.Kg;
          gg.A = w + g * gm.Kg * a.ws[0], gg.rsa = wcrs, gg.csa = a.ws[0];
          if (nb == 1) {
            gg.B = dy + n0 * a.ys[0] + g * gm.Kg * a.ys[1] + (J0 - n0 * gm.PQ) * ps;
            gg.rsb = a.ys[1], gg.csb = ps;
          } else {
            move_chunk<true>(dy, a.ys, s.Q, gm.PQ, g * gm.Kg, gm.Kg, J0, len, dybuf);
            gg.B = dybuf, gg.rsb = len, gg.csb = 1;
          }
          gg.C = dcol, gg.rsc = len, gg.csc = 1;
          gemm_bf16(gg);
          col2im_f32(gm, acc, n0, g, J0, len, dcol);
        }
      },
      [&](int64_t n0, int64_t nb) {
        const int64_t blk[4] = {nb, s.C, s.H, s.W};
        narrow4(acc, blk, dx + n0 * a.xs[0], a.xs);
      });
}

void backward_weight_bf16(const Conv2dArgs& a, const uint16_t* x, const uint16_t* dy, uint16_t* dw,
                          uint16_t* dbias) {
  const Conv2dShape s = shape_of(a);
  const Geometry<uint16_t> gm(s);
  const int64_t ps = pixel_stride(a.ys, s.Q);
  if (dbias) sum_channels_bf16(s.N, s.K, gm.PQ, dy, a.ys[0], a.ys[1], ps, dbias);
  const int64_t wshape[4] = {s.K, gm.Cg, s.R, s.S};
  if (widen_bf16(s)) {
    const WideConv wc(a);
    const int64_t xshape[4] = {s.N, s.C, s.H, s.W}, yshape[4] = {s.N, s.K, s.P, s.Q};
    widen4(x, a.xs, xshape, wc.x);
    widen4(dy, a.ys, yshape, wc.y);
    backward_weight<float>(shape_of(wc.a), view4<const float>(wc.x, wc.a.xs),
                           view4<const float>(wc.y, wc.a.ys), view4(wc.w, wc.a.ws), nullptr);
    return narrow4(wc.w, wshape, dw, a.ws);
  }
  if (runs_ok(s) && s.N > 0 && gm.PQ > 0) return backward_weight_runs(a, x, dy, dw);
  const Bf16Chunks ch(s, gm.CRS);
  // dw32 (K x CRS) float32; col (CRS x L); dybuf (Kg x L).
  const size_t dw_n = size_t(s.K * gm.CRS);
  float* dw32 = thread_scratch<float>(Scratch::conv_bf16,
                                      dw_n + size_t((gm.CRS + gm.Kg) * ch.L + 1) / 2 + 16);
  uint16_t* col = reinterpret_cast<uint16_t*>(dw32 + dw_n);
  uint16_t* dybuf = col + gm.CRS * ch.L;
  // One chunk in all: each dW_g is one product, stored straight to dw in bfloat16.
  const bool direct = s.N <= ch.imgs && gm.PQ <= ch.L;
  std::fill(dw32, dw32 + (direct ? 0 : dw_n), 0.f);
  if (gm.CRS > 0 && gm.PQ > 0)
    ch.run(
        s.N,
        [&](int64_t n0, int64_t nb, int64_t J0, int64_t len) {
          for (int64_t g = 0; g < s.groups; ++g) {
            GemmBf16 gg;
            gg.M = gm.Kg, gg.N = gm.CRS, gg.K = len;
            if (nb == 1) {
              gg.A = dy + n0 * a.ys[0] + g * gm.Kg * a.ys[1] + (J0 - n0 * gm.PQ) * ps;
              gg.rsa = a.ys[1], gg.csa = ps;
            } else {
              move_chunk<true>(dy, a.ys, s.Q, gm.PQ, g * gm.Kg, gm.Kg, J0, len, dybuf);
              gg.A = dybuf, gg.rsa = len, gg.csa = 1;
            }
            im2col_bf16(gm, x, a.xs, g, J0, len, col);
            gg.B = col, gg.rsb = 1, gg.csb = len;
            if (direct) {
              gg.C = dw + g * gm.Kg * a.ws[0], gg.rsc = a.ws[0], gg.csc = crs_stride(s, a.ws);
              gg.c_bf16 = true;
            } else {
              gg.C = dw32 + g * gm.Kg * gm.CRS, gg.rsc = gm.CRS, gg.csc = 1;
              gg.beta = 1;
            }
            gemm_bf16(gg);
          }
        },
        [](int64_t, int64_t) {});
  if (direct && gm.CRS > 0 && gm.PQ > 0) return;
  // dw (K, C/groups, R, S) = dw32 rounded, through its flattened (C/groups, R, S) stride.
  const int64_t wcrs = crs_stride(s, a.ws);
  parallel_for(s.K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      f32_to_bf16_n(dw32 + k * gm.CRS, dw + k * a.ws[0], gm.CRS, wcrs);
  });
}

}  // namespace

template <class T>
void conv2d_forward(const Conv2dArgs& a, const T* x, const T* w, const T* bias, T* y) {
  forward<T>(shape_of(a), view4(x, a.xs), view4(w, a.ws), bias, view4(y, a.ys));
}

template <class T>
void conv2d_backward_data(const Conv2dArgs& a, const T* dy, const T* w, T* dx) {
  backward_data<T>(shape_of(a), view4(dy, a.ys), view4(w, a.ws), view4(dx, a.xs));
}

template <class T>
void conv2d_backward_weight(const Conv2dArgs& a, const T* x, const T* dy, T* dw, T* dbias) {
  backward_weight<T>(shape_of(a), view4(x, a.xs), view4(dy, a.ys), view4(dw, a.ws), dbias);
}

#define NNK_INSTANTIATE_CONV(T)                                                         \
  template void conv2d_forward<T>(const Conv2dArgs&, const T*, const T*, const T*, T*); \
  template void conv2d_backward_data<T>(const Conv2dArgs&, const T*, const T*, T*);     \
  template void conv2d_backward_weight<T>(const Conv2dArgs&, const T*, const T*, T*, T*);
NNK_INSTANTIATE_CONV(float)
NNK_INSTANTIATE_CONV(double)

void conv2d_forward_bf16(const Conv2dArgs& a, const uint16_t* x, const uint16_t* w,
                         const uint16_t* bias, uint16_t* y) {
  forward_bf16(a, x, w, bias, y);
}
void conv2d_backward_data_bf16(const Conv2dArgs& a, const uint16_t* dy, const uint16_t* w,
                               uint16_t* dx) {
  backward_data_bf16(a, dy, w, dx);
}
void conv2d_backward_weight_bf16(const Conv2dArgs& a, const uint16_t* x, const uint16_t* dy,
                                 uint16_t* dw, uint16_t* dbias) {
  backward_weight_bf16(a, x, dy, dw, dbias);
}

}  // namespace cpu
}  // namespace nnk
#endif  // NNK_BASELINE_PASS
