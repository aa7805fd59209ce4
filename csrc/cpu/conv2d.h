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

#include "common/conv2d_args.h"

namespace nnk {
namespace cpu {

// a: the geometry and the strides of the pass's tensors (x or dx in xs, w or dw in ws, y or dy
// in ys).
template <class T>
void conv2d_forward(const Conv2dArgs& a, const T* x, const T* w, const T* bias, T* y);

// dx = the adjoint of the forward in x (every element of dx is written).
template <class T>
void conv2d_backward_data(const Conv2dArgs& a, const T* dy, const T* w, T* dx);

// dw = the adjoint of the forward in w (written, not accumulated); dbias (K,) = sum of dy over
// n, p, q when not null.
template <class T>
void conv2d_backward_weight(const Conv2dArgs& a, const T* x, const T* dy, T* dw, T* dbias);

}  // namespace cpu

// The CUDA backend (cuda/conv2d.cu): implicit-GEMM passes with the same arguments, float32, on
// `stream` of `device`. The weight's (C/groups, R, S) dims, and the pixels of y / dx / dy, must
// flatten.
namespace cuda {
void conv2d_forward(const Conv2dArgs& a, const float* x, const float* w, const float* bias,
                    float* y, int device, void* stream);
void conv2d_backward_data(const Conv2dArgs& a, const float* dy, const float* w, float* dx,
                          int device, void* stream);
void conv2d_backward_weight(const Conv2dArgs& a, const float* x, const float* dy, float* dw,
                            float* dbias, int device, void* stream);
}  // namespace cuda
}  // namespace nnk
