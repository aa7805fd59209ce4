// CUDA SGEMM (arguments in common/gemm_args.h): the tile kernel of gemm_tile.cuh with strided
// operands. Global loads are float4 when an operand is contiguous along m/n or along k and
// 16-byte aligned, scalar (coalesced along the smaller stride) otherwise, so any strides work,
// transposed operands included. Edges are bounds-checked. Batched products run over blockIdx.z.
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/cuda_api.h"
#include "cuda/gemm_epilogue.cuh"
#include "cuda/gemm_tile.cuh"

namespace nnk {
namespace cuda {
namespace {

using namespace tile;

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// A strided operand with element (w, k) at base[w*ws + k*ks], W along w, batch stride bs; the
// slab mode picks float4 loads where alignment allows.
Strided strided(const float* base, int64_t ws, int64_t ks, int64_t W, int64_t bs) {
  const bool ok4 = aligned16(base) && bs % 4 == 0;
  int mode;
  if (ws == 1 && ks % 4 == 0 && ok4)
    mode = kVecWide;
  else if (ks == 1 && ws % 4 == 0 && ok4)
    mode = kVecK;
  else
    mode = (ws < 0 ? -ws : ws) <= (ks < 0 ? -ks : ks) ? kWide : kAlongK;
  Strided s;
  s.base = base;
  s.ws = ws;
  s.ks = ks;
  s.W = W;
  s.off.s_outer = bs;
  s.mode = mode;
  return s;
}

}  // namespace

void sgemm(const Gemm<float>& g, int64_t batch, int64_t sa, int64_t sb, int64_t sc, int device,
           void* stream) {
  if (g.M <= 0 || g.N <= 0 || batch <= 0) return;
  Problem<Strided, Strided, StoreC> pr;
  pr.M = g.M;
  pr.N = g.N;
  pr.K = g.alpha == 0.f ? 0 : g.K;  // alpha == 0: A and B are not read (BLAS semantics)
  pr.items = batch;
  pr.ksplit = 1;
  pr.a = strided(g.A, g.rsa, g.csa, g.M, sa);  // A slab: wide = m, k
  pr.b = strided(g.B, g.csb, g.rsb, g.N, sb);  // B slab: wide = n, k
  pr.epi.C = g.C;
  pr.epi.rsc = g.rsc;
  pr.epi.csc = g.csc;
  pr.epi.off.s_outer = sc;
  pr.epi.M = g.M;
  pr.epi.N = g.N;
  pr.epi.alpha = g.alpha;
  pr.epi.beta = g.beta;
  pr.epi.bias_m = g.bias_m;
  pr.epi.bias_n = g.bias_n;
  DeviceGuard guard(device);
  gemm_kernel<<<grid_for(pr), THREADS, 0, static_cast<cudaStream_t>(stream)>>>(pr);
  check(cudaGetLastError(), "sgemm launch");
}

}  // namespace cuda
}  // namespace nnk
