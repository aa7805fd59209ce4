// LSTM, CPU backend of common/lstm_driver.h: the project's GEMM, the fused step kernels of the
// active ISA, rows of a step split across threads.
#include "cpu/lstm.h"

#include "common/isa.h"
#include "common/lstm_driver.h"
#include "common/threading.h"
#include "common/workspace.h"
#include "cpu/gemm.h"
#include "cpu/lstm_kernel.h"
#include "cpu/reduce.h"

namespace nnk {
namespace cpu {

template <class T>
const LstmKernels<T>& active_lstm_kernels() {
  switch (active_isa()) {
#if defined(NNK_X86)
    case Isa::avx512:
      return lstm_kernels_avx512<T>();
    case Isa::avx2:
      return lstm_kernels_avx2<T>();
#endif
    default:
      return lstm_kernels_scalar<T>();
  }
}

namespace {

template <class T>
struct CpuBackend {
  const LstmKernels<T>& k = active_lstm_kernels<T>();

  void gemm(const Gemm<T>& g) { cpu::gemm(g); }

  const T* pack_b(int64_t K, int64_t N, const T* B, int64_t rsb, int64_t csb) {
    T* dst = thread_scratch<T>(Scratch::lstm_weight, gemm_packed_b_size<T>(K, N));
    gemm_pack_b(K, N, B, rsb, csb, dst);
    return dst;
  }

  // A step is ~10 flops and a few transcendentals per unit: split rows so each thread gets at
  // least ~16K units (a fork costs a few microseconds).
  template <class F>
  void rows(const LstmStep<T>& s, F fn) {
    const int64_t grain = s.H >= 16384 ? 1 : 16384 / s.H;
    parallel_for(s.B, grain, [&](int64_t b0, int64_t b1) { fn(s, b0, b1); });
  }
  void step_forward(const LstmStep<T>& s) { rows(s, k.forward_rows); }
  void step_backward(const LstmStep<T>& s) { rows(s, k.backward_rows); }

  void sum_rows(int64_t R, int64_t N, const T* x, int64_t rsx, int64_t csx, T* out) {
    cpu::sum_rows(R, N, x, rsx, csx, out, int64_t(1));
  }
};

}  // namespace

template <class T>
void lstm_layer_forward(const LstmLayer<T>& a) {
  CpuBackend<T> be;
  nnk::lstm_layer_forward(a, be);
}

template <class T>
void lstm_layer_backward(const LstmLayer<T>& a) {
  CpuBackend<T> be;
  nnk::lstm_layer_backward(a, be);
}

template void lstm_layer_forward<float>(const LstmLayer<float>&);
template void lstm_layer_forward<double>(const LstmLayer<double>&);
template void lstm_layer_backward<float>(const LstmLayer<float>&);
template void lstm_layer_backward<double>(const LstmLayer<double>&);
template const LstmKernels<float>& active_lstm_kernels<float>();
template const LstmKernels<double>& active_lstm_kernels<double>();

}  // namespace cpu
}  // namespace nnk
