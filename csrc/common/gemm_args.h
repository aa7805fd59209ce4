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
};

}  // namespace nnk
