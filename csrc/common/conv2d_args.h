// The arguments of one conv2d pass, shared by the CPU (cpu/conv2d.cpp) and CUDA (cuda/conv2d.cu)
// kernels: the geometry and the element strides of the three tensors of the pass. Its index
// methods are the math of the CUDA implicit GEMM, host- and device-callable so that
// tests/test_cuda_conv_index.py checks them on a CPU against a direct convolution (the CUDA
// kernels' operand providers read memory only through them).
//
//   x (N, C, H, W), w (K, C/groups, R, S), y (N, K, P, Q); Cg = C/groups, Kg = K/groups.
//   forward          item (n, g):  Y (Kg x PQ) = W_g (Kg x CRS) . col (CRS x PQ)
//   backward-data    item (n, g):  dX (Cg x HW) = W~ (Cg x KgRS) . gather(dY) (KgRS x HW)
//   backward-weight  item g:       dW (Kg x CRS) = dY (Kg x N*PQ) . col^T (N*PQ x CRS)
// Offsets are in elements; -1 marks a structural zero (padding, or a stride that skips a pixel).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define NNK_HD __host__ __device__ __forceinline__
#else
#define NNK_HD inline
#endif

namespace nnk {

struct Conv2dArgs {
  int64_t N, C, H, W;           // input
  int64_t K, R, S;              // weight (K, C / groups, R, S)
  int64_t P, Q;                 // output
  int64_t sh, sw;               // stride
  int64_t ph, pw;               // padding before (top, left); after follows from P, Q
  int64_t dh, dw;               // dilation
  int64_t groups, Cg, Kg;       // Cg = C / groups, Kg = K / groups
  int64_t xs[4], ws[4], ys[4];  // strides of x (or dx), w (or dw), y (or dy), NCHW order

  // col[crs][pix] of image n, group g: x offset, or -1 where the window is in the padding.
  NNK_HD int64_t col(int64_t n, int64_t g, int64_t crs, int64_t pix) const {
    const int64_t c = crs / (R * S), rs = crs - c * (R * S), r = rs / S, s = rs - r * S;
    const int64_t p = pix / Q, q = pix - p * Q;
    const int64_t ih = p * sh - ph + r * dh, iw = q * sw - pw + s * dw;
    if (ih < 0 || ih >= H || iw < 0 || iw >= W) return -1;
    return n * xs[0] + (g * Cg + c) * xs[1] + ih * xs[2] + iw * xs[3];
  }

  // W_g[k][crs] (the forward's A): w offset.
  NNK_HD int64_t weight(int64_t g, int64_t k, int64_t crs) const {
    const int64_t c = crs / (R * S), rs = crs - c * (R * S), r = rs / S, s = rs - r * S;
    return (g * Kg + k) * ws[0] + c * ws[1] + r * ws[2] + s * ws[3];
  }

  // W~[c][krs] = w[g*Kg + k, c, r, s] (the data gradient's A).
  NNK_HD int64_t weight_t(int64_t g, int64_t c, int64_t krs) const {
    const int64_t k = krs / (R * S), rs = krs - k * (R * S), r = rs / S, s = rs - r * S;
    return (g * Kg + k) * ws[0] + c * ws[1] + r * ws[2] + s * ws[3];
  }

  // gather(dY)[krs][pix] for input pixel pix = (h, w) of image n, group g: the dY element whose
  // window tap (r, s) lands on (h, w), or -1 when no output pixel does (padding, stride gaps).
  NNK_HD int64_t dy_gather(int64_t n, int64_t g, int64_t krs, int64_t pix) const {
    const int64_t k = krs / (R * S), rs = krs - k * (R * S), r = rs / S, s = rs - r * S;
    const int64_t h = pix / W, w = pix - h * W;
    const int64_t th = h + ph - r * dh, tw = w + pw - s * dw;
    if (th < 0 || tw < 0) return -1;
    const int64_t p = th / sh, q = tw / sw;
    if (p * sh != th || q * sw != tw || p >= P || q >= Q) return -1;
    return n * ys[0] + (g * Kg + k) * ys[1] + p * ys[2] + q * ys[3];
  }

  // dY[k][(n, pix)] over all images (the weight gradient's A), group g.
  NNK_HD int64_t dy_row(int64_t g, int64_t k, int64_t npix) const {
    const int64_t n = npix / (P * Q), pix = npix - n * (P * Q), p = pix / Q, q = pix - p * Q;
    return n * ys[0] + (g * Kg + k) * ys[1] + p * ys[2] + q * ys[3];
  }

  // col^T[(n, pix)][crs] (the weight gradient's B), group g.
  NNK_HD int64_t col_t(int64_t g, int64_t npix, int64_t crs) const {
    const int64_t n = npix / (P * Q);
    return col(n, g, crs, npix - n * (P * Q));
  }
};

}  // namespace nnk
