// The arguments of one GEMM, shared by the CPU (cpu/gemm.h) and CUDA (cuda/cuda_api.h) kernels:
//
//   C (M x N) = alpha * A (M x K) . B (K x N) + beta * C  [+ bias_m[i]]  [+ bias_n[j]]
//
// Every operand is a strided view with element strides of any sign: A[i,k] = A[i*rsa + k*csa],
// so transposed operands need no copy. beta == 0 means C is not read (NaN/inf already in C do not
// propagate, as in BLAS). The biases are contiguous vectors added once to the result.
#pragma once
#include <cstdint>

namespace nnk {

template <class T>
struct Gemm {
  int64_t M = 0, N = 0, K = 0;
  const T* A = nullptr;
  int64_t rsa = 0, csa = 0;
  const T* B = nullptr;
  int64_t rsb = 0, csb = 0;
  T* C = nullptr;
  int64_t rsc = 0, csc = 0;
  T alpha = 1, beta = 0;
  const T* bias_m = nullptr;  // (M,) added to row i, or null
  const T* bias_n = nullptr;  // (N,) added to column j, or null

  // Optional (CPU): B as a packing routine instead of strides, for operands that only exist
  // implicitly (conv2d's im2col is written straight into the panels). When set, B/rsb/csb are
  // ignored and the GEMM calls pack_b_fn(pack_b_ctx, p0, k, j0, n, nr, dst) to write rows
  // [p0, p0+k) x columns [j0, j0+n) of B as ceil(n/nr) panels of k*nr: element (p0+kk, j0+q*nr+jj)
  // at dst[q*nr*k + kk*nr + jj], columns past n zeroed. n <= 4096; called from every thread.
  void (*pack_b_fn)(const void* ctx, int64_t p0, int64_t k, int64_t j0, int64_t n, int nr,
                    T* dst) = nullptr;
  const void* pack_b_ctx = nullptr;

  // Optional (CPU): B already packed by cpu::gemm_pack_b for this K and N (a weight applied many
  // times, e.g. the LSTM's recurrent weight at every time step). B, rsb, csb, pack_b_fn ignored.
  const T* packed_b = nullptr;

  // Optional (CPU): A's rows and / or columns at arbitrary offsets, A[i,k] = A[row(i) + col(k)]
  // with row(i) = a_rows[i] (else i*rsa) and col(k) = a_cols[k] (else k*csa): an implicit
  // operand such as conv2d's windows in a zero-padded channels-last copy of x (row i = output
  // pixel i at its window's origin, column k = (tap, channel) at its offset from there). A is
  // then read in place, never packed.
  const int64_t* a_rows = nullptr;
  const int64_t* a_cols = nullptr;
};

}  // namespace nnk
