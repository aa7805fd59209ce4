// Reductions shared by the ops' backward passes (bias gradients and the like).
#pragma once
#include <cstdint>

namespace nnk {
namespace cpu {

// out[j*so] = sum_i x[i*rsx + j*csx] for i < R, j < N (a column sum of an R x N strided matrix:
// the bias gradient of Linear is sum_rows(dout)). Accumulates in float64 for either dtype.
template <class T>
void sum_rows(int64_t R, int64_t N, const T* x, int64_t rsx, int64_t csx, T* out, int64_t so);

// out[c] = sum_{n, i} x[n*sn + c*sc + i*si] for n < N, c < C, i < HW: the per-channel sum of an
// (N, C, HW) tensor (conv2d's bias gradient, batch norm's statistics). Accumulates in float64.
template <class T>
void sum_channels(int64_t N, int64_t C, int64_t HW, const T* x, int64_t sn, int64_t sc, int64_t si,
                  T* out);
// The same on bfloat16 words (raw uint16), sums rounded once to bfloat16.
void sum_channels_bf16(int64_t N, int64_t C, int64_t HW, const uint16_t* x, int64_t sn, int64_t sc,
                       int64_t si, uint16_t* out);

}  // namespace cpu
}  // namespace nnk
