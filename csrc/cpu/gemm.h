// The project's one GEMM on the CPU (arguments: common/gemm_args.h). Linear, conv2d and LSTM
// all call this.
//
// Design (BLIS): pack A into MR-row panels and B into NR-column panels, block for the caches
// (A block mc x kc in L2, B micro-panel kc x NR in L1, B block kc x nc in L3), run a register-
// blocked MR x NR micro-kernel per ISA (AVX-512 / AVX2+FMA / portable), threads split the C tiles.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/gemm_args.h"

namespace nnk {
namespace cpu {

// Runs on up to `nthreads` threads (0: nnk::num_threads(); always 1 inside a parallel region).
// Packing workspace comes from a buffer owned by the calling thread and kept for reuse.
// Throws std::bad_alloc if that buffer cannot grow; call it outside parallel regions, or size a
// workspace yourself with gemm_workspace() and pass it.
template <class T>
void gemm(const Gemm<T>& g, int nthreads = 0);
template <class T>
size_t gemm_workspace(const Gemm<T>& g, int nthreads);  // in elements of T
template <class T>
void gemm(const Gemm<T>& g, int nthreads, T* workspace);

// `batch` independent products: item b uses A + b*sa, B + b*sb, C + b*sc (sa or sb may be 0 to
// broadcast an operand; the biases are shared). Small items run in parallel across the batch,
// large ones one after another with all threads each.
template <class T>
void gemm_batched(const Gemm<T>& g, int64_t batch, int64_t sa, int64_t sb, int64_t sc,
                  int nthreads = 0);

// An operand B (K x N, any strides) multiplied many times is packed once: gemm_pack_b writes
// gemm_packed_b_size(K, N) elements, which products then take as Gemm::packed_b, skipping B's
// packing and the barriers around it. The layout is the active micro-kernel's: pack and multiply
// within one call into the library (the ISA must not change in between).
template <class T>
size_t gemm_packed_b_size(int64_t K, int64_t N);  // in elements of T
template <class T>
void gemm_pack_b(int64_t K, int64_t N, const T* B, int64_t rsb, int64_t csb, T* dst,
                 int nthreads = 0);

// Name of the micro-kernel the active ISA runs, e.g. "sgemm_avx2_6x16".
template <class T>
const char* gemm_kernel_name();

}  // namespace cpu
}  // namespace nnk
