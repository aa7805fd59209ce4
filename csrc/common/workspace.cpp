#include "common/workspace.h"

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <new>

namespace nnk {

namespace {
struct Buffer {
  void* p = nullptr;
  size_t bytes = 0;
  ~Buffer() { std::free(p); }
};
thread_local Buffer tls[static_cast<int>(Scratch::count)];
}  // namespace

void* thread_scratch(Scratch slot, size_t bytes) {
  Buffer& b = tls[static_cast<int>(slot)];
  if (bytes > b.bytes) {
    std::free(b.p);
    b.p = nullptr;
    b.bytes = 0;
    const size_t rounded = (bytes + 63) / 64 * 64;
    b.p = std::aligned_alloc(64, rounded);
    if (!b.p) throw std::bad_alloc();
    b.bytes = rounded;
  }
  return b.p;
}

namespace {
std::atomic<long long> g_stream_min{0};  // 0: not overridden
}  // namespace

long long l2_cache_bytes() {
  static const long long bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long b = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (b > 0) return (long long)b;
#endif
    return 512ll << 10;
  }();
  return bytes;
}

long long stream_min_bytes() {
  static const long long cache = [] {
    long long b = 32ll << 20;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (l3 > 0) b = l3;
#endif
    return b > (8ll << 20) ? b : 8ll << 20;
  }();
  const long long set = g_stream_min.load(std::memory_order_relaxed);
  return set > 0 ? set : cache;
}

void set_stream_min_bytes(long long bytes) {
  g_stream_min.store(bytes > 0 ? bytes : 0, std::memory_order_relaxed);
}

}  // namespace nnk
