// LSTM on CUDA: the CUDA backend of common/lstm_driver.h (the same time loop as the CPU: one GEMM
// for the input projection of all steps, then per step one GEMM into the gate rows and one fused
// pointwise kernel; backward likewise, then the weight-gradient GEMMs over all steps). Every
// launch goes on the caller's stream; fp32.
//
// Step kernels: one thread per hidden unit (b, j) of the step's (B, H) grid, reading its four gate
// values (i, f, g, o at columns j, H + j, 2H + j, 3H + j of row b: coalesced along j).
#include <cstdint>

#include "common/lstm_driver.h"
#include "cuda/common.cuh"
#include "cuda/cuda_api.h"

namespace nnk {
namespace cuda {
namespace {

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

__global__ void lstm_step_forward_kernel(LstmStep<float> s) {
  const int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= s.B * s.H) return;
  const int64_t b = u / s.H, j = u % s.H;
  float* g = s.gates + b * 4 * s.H + j;
  const float i = sigmoidf(g[0]), f = sigmoidf(g[s.H]), gg = tanhf(g[2 * s.H]),
              o = sigmoidf(g[3 * s.H]);
  const float c = fmaf(f, s.c_prev[b * s.ldcp + j], i * gg);
  g[0] = i;
  g[s.H] = f;
  g[2 * s.H] = gg;
  g[3 * s.H] = o;
  s.c[b * s.H + j] = c;
  s.h[b * s.ldh + j] = o * tanhf(c);
}

__global__ void lstm_step_backward_kernel(LstmStep<float> s) {
  const int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= s.B * s.H) return;
  const int64_t b = u / s.H, j = u % s.H;
  float* g = s.gates + b * 4 * s.H + j;
  const float i = g[0], f = g[s.H], gg = g[2 * s.H], o = g[3 * s.H];
  float dh = s.dh_rec ? s.dh_rec[u] : 0.f;
  if (s.dh_out) dh += s.dh_out[b * s.lddh + j];
  const float tc = tanhf(s.c[u]);
  const float dct = fmaf(dh * o, 1.f - tc * tc, s.dc[u]);
  s.dc[u] = dct * f;
  g[0] = dct * gg * i * (1.f - i);
  g[s.H] = dct * s.c_prev[b * s.ldcp + j] * f * (1.f - f);
  g[2 * s.H] = dct * i * (1.f - gg * gg);
  g[3 * s.H] = dh * tc * o * (1.f - o);
}

struct CudaBackend {
  int device;
  cudaStream_t stream;

  void gemm(const Gemm<float>& g) { sgemm(g, 1, 0, 0, 0, device, stream); }
  // The CUDA GEMM reads W_hh from L2 at every step; nothing to pack ahead.
  const float* pack_b(int64_t, int64_t, const float*, int64_t, int64_t) { return nullptr; }

  template <class K>
  void launch(K kernel, const LstmStep<float>& s, const char* what) {
    const int64_t n = s.B * s.H;
    if (n == 0) return;
    kernel<<<ceil_div_u(n, 256), 256, 0, stream>>>(s);
    check(cudaGetLastError(), what);
  }
  void step_forward(const LstmStep<float>& s) {
    launch(lstm_step_forward_kernel, s, "lstm step forward launch");
  }
  void step_backward(const LstmStep<float>& s) {
    launch(lstm_step_backward_kernel, s, "lstm step backward launch");
  }
  void sum_rows(int64_t R, int64_t N, const float* x, int64_t rsx, int64_t csx, float* out) {
    cuda::sum_rows(R, N, x, rsx, csx, out, 1, device, stream);
  }
  // One block: every step's GEMM and kernel already spread over the whole GPU.
  template <class F>
  void row_blocks(int64_t B, const Gemm<float>&, F&& fn) {
    fn(0, B, *this);
  }
};

}  // namespace

void lstm_layer_forward(const LstmLayer<float>& a, int device, void* stream) {
  DeviceGuard guard(device);
  CudaBackend be{device, static_cast<cudaStream_t>(stream)};
  nnk::lstm_layer_forward(a, be);
}

void lstm_layer_backward(const LstmLayer<float>& a, int device, void* stream) {
  DeviceGuard guard(device);
  CudaBackend be{device, static_cast<cudaStream_t>(stream)};
  nnk::lstm_layer_backward(a, be);
}

}  // namespace cuda
}  // namespace nnk
