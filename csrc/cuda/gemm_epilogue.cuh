// Epilogues of the tile kernel (gemm_tile.cuh).
#pragma once
#include <cstdint>

#include "cuda/gemm_tile.cuh"

namespace nnk {
namespace cuda {
namespace tile {

// C = alpha * acc + beta * C + bias_m[m] + bias_n[n] (beta == 0: C is not read), float4 stores
// where C allows. Item b's C starts at C + off(b); its biases at bias_m + bias_off(b) (conv's
// groups), bias_n + bias_off(b).
struct StoreC {
  float* C;
  int64_t rsc, csc, M, N;
  ItemOffset off, bias_off;
  float alpha = 1.f, beta = 0.f;
  const float* bias_m = nullptr;
  const float* bias_n = nullptr;

  __device__ void operator()(int64_t item, int64_t m0, int64_t n0, const float acc[8][8], int tx,
                             int ty) const {
    float* Cb = C + off(item);
    const int64_t bo = bias_off(item);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t m = m0 + tile_row(i, ty);
      if (m >= M) continue;
      const float bm = bias_m ? bias_m[bo + m] : 0.f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t n = n0 + h * 64 + tx * 4;
        float* c = Cb + m * rsc + n * csc;
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          v[e] = alpha * acc[i][h * 4 + e] + bm;
          if (bias_n && n + e < N) v[e] += bias_n[bo + n + e];
        }
        const bool vec = csc == 1 && n + 3 < N && (reinterpret_cast<uintptr_t>(c) & 15) == 0;
        if (vec) {
          if (beta != 0.f) {
            const float4 old = *reinterpret_cast<const float4*>(c);
            v[0] += beta * old.x;
            v[1] += beta * old.y;
            v[2] += beta * old.z;
            v[3] += beta * old.w;
          }
          *reinterpret_cast<float4*>(c) = make_float4(v[0], v[1], v[2], v[3]);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (n + e >= N) break;
            float* ce = c + e * csc;
            *ce = beta != 0.f ? v[e] + beta * *ce : v[e];
          }
        }
      }
    }
  }
};

// C += acc with atomics (split-K slices of one product add into the same C).
struct AddC {
  float* C;
  int64_t rsc, csc, M, N;
  ItemOffset off;

  __device__ void operator()(int64_t item, int64_t m0, int64_t n0, const float acc[8][8], int tx,
                             int ty) const {
    float* Cb = C + off(item);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t m = m0 + tile_row(i, ty);
      if (m >= M) continue;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t n = n0 + tile_row(j, tx);
        if (n < N) atomicAdd(Cb + m * rsc + n * csc, acc[i][j]);
      }
    }
  }
};

}  // namespace tile
}  // namespace cuda
}  // namespace nnk
