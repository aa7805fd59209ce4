#include "common/workspace.h"

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

}  // namespace nnk
