// Checks the index math of the CUDA implicit-GEMM convolution (csrc/common/conv2d_args.h) on the
// CPU: each pass computed as the GEMM the CUDA kernels run, through Conv2dArgs, must equal the
// convolution written out directly. Built and run by tests/test_cuda_conv_index.py.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "common/conv2d_args.h"

using nnk::Conv2dArgs;

struct Case {
  int64_t N, C, H, W, K, R, S, sh, sw, ph, pw, pb, pr, dh, dw, groups;
  bool x_cl, y_cl;  // channels_last strides for x and y
};

static void strides(int64_t n, int64_t c, int64_t h, int64_t w, bool cl, int64_t* s) {
  (void)n;
  if (cl) {
    s[0] = h * w * c, s[1] = 1, s[2] = w * c, s[3] = c;
  } else {
    s[0] = c * h * w, s[1] = h * w, s[2] = w, s[3] = 1;
  }
}

static double check(const Case& t, std::mt19937& rng) {
  Conv2dArgs ix{};
  ix.N = t.N, ix.C = t.C, ix.H = t.H, ix.W = t.W, ix.K = t.K, ix.R = t.R, ix.S = t.S;
  ix.sh = t.sh, ix.sw = t.sw, ix.ph = t.ph, ix.pw = t.pw, ix.dh = t.dh, ix.dw = t.dw;
  ix.groups = t.groups, ix.Cg = t.C / t.groups, ix.Kg = t.K / t.groups;
  ix.P = (t.H + t.ph + t.pb - t.dh * (t.R - 1) - 1) / t.sh + 1;
  ix.Q = (t.W + t.pw + t.pr - t.dw * (t.S - 1) - 1) / t.sw + 1;
  const int64_t P = ix.P, Q = ix.Q, Cg = ix.Cg, Kg = ix.Kg, RS = t.R * t.S, CRS = Cg * RS;
  strides(t.N, t.C, t.H, t.W, t.x_cl, ix.xs);
  strides(t.K, Cg, t.R, t.S, false, ix.ws);
  strides(t.N, t.K, P, Q, t.y_cl, ix.ys);
  std::uniform_real_distribution<double> U(-1, 1);
  std::vector<double> x(t.N * t.C * t.H * t.W), w(t.K * CRS), dy(t.N * t.K * P * Q);
  for (auto& v : x) v = U(rng);
  for (auto& v : w) v = U(rng);
  for (auto& v : dy) v = U(rng);
  auto X = [&](int64_t n, int64_t c, int64_t h, int64_t q) {
    return x[n * ix.xs[0] + c * ix.xs[1] + h * ix.xs[2] + q * ix.xs[3]];
  };
  auto Wt = [&](int64_t k, int64_t c, int64_t r, int64_t s) {
    return w[k * ix.ws[0] + c * ix.ws[1] + r * ix.ws[2] + s * ix.ws[3]];
  };
  auto DY = [&](int64_t n, int64_t k, int64_t p, int64_t q) {
    return dy[n * ix.ys[0] + k * ix.ys[1] + p * ix.ys[2] + q * ix.ys[3]];
  };
  double worst = 0;

  // forward: Y[n]_g (Kg x PQ) = W_g . col
  for (int64_t n = 0; n < t.N; ++n)
    for (int64_t g = 0; g < t.groups; ++g)
      for (int64_t k = 0; k < Kg; ++k)
        for (int64_t pix = 0; pix < P * Q; ++pix) {
          double gemm = 0, direct = 0;
          for (int64_t crs = 0; crs < CRS; ++crs) {
            const int64_t off = ix.col(n, g, crs, pix);
            if (off >= 0) gemm += w[ix.weight(g, k, crs)] * x[off];
          }
          const int64_t p = pix / Q, q = pix % Q;
          for (int64_t c = 0; c < Cg; ++c)
            for (int64_t r = 0; r < t.R; ++r)
              for (int64_t s = 0; s < t.S; ++s) {
                const int64_t ih = p * t.sh - t.ph + r * t.dh, iw = q * t.sw - t.pw + s * t.dw;
                if (ih >= 0 && ih < t.H && iw >= 0 && iw < t.W)
                  direct += Wt(g * Kg + k, c, r, s) * X(n, g * Cg + c, ih, iw);
              }
          worst = std::fmax(worst, std::fabs(gemm - direct));
        }

  // backward-data: dX[n]_g (Cg x HW) = W~ . gather(dY), against the scatter of every window
  std::vector<double> dx(t.N * t.C * t.H * t.W, 0.0);
  for (int64_t n = 0; n < t.N; ++n)
    for (int64_t k = 0; k < t.K; ++k)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t q = 0; q < Q; ++q)
          for (int64_t c = 0; c < Cg; ++c)
            for (int64_t r = 0; r < t.R; ++r)
              for (int64_t s = 0; s < t.S; ++s) {
                const int64_t ih = p * t.sh - t.ph + r * t.dh, iw = q * t.sw - t.pw + s * t.dw;
                if (ih >= 0 && ih < t.H && iw >= 0 && iw < t.W)
                  dx[((n * t.C + (k / Kg) * Cg + c) * t.H + ih) * t.W + iw] +=
                      Wt(k, c, r, s) * DY(n, k, p, q);
              }
  for (int64_t n = 0; n < t.N; ++n)
    for (int64_t g = 0; g < t.groups; ++g)
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t pix = 0; pix < t.H * t.W; ++pix) {
          double gemm = 0;
          for (int64_t krs = 0; krs < Kg * RS; ++krs) {
            const int64_t off = ix.dy_gather(n, g, krs, pix);
            if (off >= 0) gemm += w[ix.weight_t(g, c, krs)] * dy[off];
          }
          worst = std::fmax(worst, std::fabs(gemm - dx[(n * t.C + g * Cg + c) * t.H * t.W + pix]));
        }

  // backward-weight: dW_g (Kg x CRS) = dY_g (Kg x N*PQ) . col^T
  for (int64_t g = 0; g < t.groups; ++g)
    for (int64_t m = 0; m < Kg; ++m)
      for (int64_t crs = 0; crs < CRS; ++crs) {
        double gemm = 0, direct = 0;
        for (int64_t npix = 0; npix < t.N * P * Q; ++npix) {
          const int64_t off = ix.col_t(g, npix, crs);
          if (off >= 0) gemm += dy[ix.dy_row(g, m, npix)] * x[off];
        }
        const int64_t c = crs / RS, r = crs % RS / t.S, s = crs % t.S;
        for (int64_t n = 0; n < t.N; ++n)
          for (int64_t p = 0; p < P; ++p)
            for (int64_t q = 0; q < Q; ++q) {
              const int64_t ih = p * t.sh - t.ph + r * t.dh, iw = q * t.sw - t.pw + s * t.dw;
              if (ih >= 0 && ih < t.H && iw >= 0 && iw < t.W)
                direct += DY(n, g * Kg + m, p, q) * X(n, g * Cg + c, ih, iw);
            }
        worst = std::fmax(worst, std::fabs(gemm - direct));
      }
  return worst;
}

int main() {
  std::mt19937 rng(1234);
  std::vector<Case> cases = {
      {2, 3, 7, 6, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, false, false},
      {2, 4, 9, 8, 6, 3, 2, 2, 1, 0, 1, 2, 0, 1, 2, 2, true, false},
      {1, 6, 8, 8, 6, 3, 3, 2, 2, 1, 1, 1, 1, 2, 1, 6, false, true},
      {2, 4, 5, 6, 4, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, true, true},
      {2, 2, 6, 5, 4, 2, 3, 3, 2, 3, 2, 1, 4, 1, 1, 2, false, false},
      {1, 1, 8, 8, 3, 3, 3, 1, 1, 0, 0, 0, 0, 1, 1, 1, false, false},
  };
  std::uniform_int_distribution<int> D(1, 4), B(0, 1);
  for (int i = 0; i < 40; ++i) {
    Case t{};
    t.groups = D(rng) <= 2 ? 1 : 2;
    t.N = D(rng) % 2 + 1, t.C = t.groups * D(rng), t.K = t.groups * D(rng);
    t.R = D(rng), t.S = D(rng), t.sh = D(rng) % 3 + 1, t.sw = D(rng) % 3 + 1;
    t.dh = D(rng) % 2 + 1, t.dw = D(rng) % 2 + 1;
    t.ph = D(rng) - 1, t.pw = D(rng) - 1, t.pb = D(rng) - 1, t.pr = D(rng) - 1;
    t.H = t.dh * (t.R - 1) + D(rng) + 1, t.W = t.dw * (t.S - 1) + D(rng) + 1;
    t.x_cl = B(rng), t.y_cl = B(rng);
    cases.push_back(t);
  }
  double worst = 0;
  for (const Case& t : cases) worst = std::fmax(worst, check(t, rng));
  std::printf("cases %zu worst %.3e\n", cases.size(), worst);
  return worst < 1e-9 ? 0 : 1;
}
