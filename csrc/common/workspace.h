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
  gemm_bf16 = 5,
  conv_bf16 = 6,
  conv_bf16_weight = 7,
  batch_norm_bf16 = 8,
  count = 9
};

// At least `bytes` of this thread's scratch in `slot`; throws std::bad_alloc when it cannot grow.
// Call it outside parallel regions (an exception there would terminate the process).
void* thread_scratch(Scratch slot, size_t bytes);

template <class T>
T* thread_scratch(Scratch slot, size_t elems) {
  return static_cast<T*>(thread_scratch(slot, elems * sizeof(T)));
}

// The level-2 cache of a core in bytes (512 KiB where the system does not say): the GEMMs' blocks.
long long l2_cache_bytes();

// The smallest output (bytes) worth writing with non-temporal stores: the last-level cache's size
// (at least 8 MiB; 32 MiB where the system does not say). A smaller output stays in that cache for
// the next layer, which a non-temporal store would send to DRAM: MobileNetV2's 9.6 MB batch norm
// at 224x224 ran 1160 us against torch's 864 with them, on a 2-vCPU Xeon whose L3 is 480 MiB.
long long stream_min_bytes();
// Overrides it (0: back to the default). A test hook.
void set_stream_min_bytes(long long bytes);

}  // namespace nnk
