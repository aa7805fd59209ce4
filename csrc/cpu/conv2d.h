// 2-D convolution on the CPU: forward, backward-data and backward-weight (+ bias), on the
// project's GEMM. Zero padding only (other padding modes are an explicit pad before the conv).
//
//   x  (N, C, H, W)        w  (K, C/groups, R, S)        y  (N, K, P, Q)
//   y[n, k, p, q] = bias[k] + sum_{c in group(k), r, s} w[k, c, r, s] * x[n, c, p*sh - ph + r*dh,
//                                                                       q*sw - pw + s*dw]
// Tensors are 4-D strided views (element strides, NCHW dim order, any memory format). The weight
// (and its gradient) must have (C/groups, R, S) flattenable: w.s[1] == R*S*w.s[3] and w.s[2] ==
// S*w.s[3]; the bindings check it.
#pragma once
#include <cstdint>

namespace nnk {
namespace cpu {

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

template <class T>
void conv2d_forward(const Conv2dShape& sh, View4<const T> x, View4<const T> w, const T* bias,
                    View4<T> y);

// dx = the adjoint of the forward in x (every element of dx is written).
template <class T>
void conv2d_backward_data(const Conv2dShape& sh, View4<const T> dy, View4<const T> w, View4<T> dx);

// dw = the adjoint of the forward in w (written, not accumulated); dbias (K,) = sum of dy over
// n, p, q when not null.
template <class T>
void conv2d_backward_weight(const Conv2dShape& sh, View4<const T> x, View4<const T> dy, View4<T> dw,
                            T* dbias);

}  // namespace cpu
}  // namespace nnk
