// Scratch memory for the CPU kernels: per calling thread, 64-byte aligned, grown on demand and kept
// for reuse. Each slot is a separate buffer, so a kernel that calls another (conv2d calling the
// GEMM) does not clobber its caller's scratch. Never tensor memory that Python sees.
#pragma once
#include <cstddef>

namespace nnk {

enum class Scratch : int {
  gemm = 0,
  conv = 1,
  conv_weight = 2,
  lstm_weight = 3,
  winograd_filter = 4,
  count = 5
};

// At least `bytes` of this thread's scratch in `slot`; throws std::bad_alloc when it cannot grow.
// Call it outside parallel regions (an exception there would terminate the process).
void* thread_scratch(Scratch slot, size_t bytes);

template <class T>
T* thread_scratch(Scratch slot, size_t elems) {
  return static_cast<T*>(thread_scratch(slot, elems * sizeof(T)));
}

}  // namespace nnk
