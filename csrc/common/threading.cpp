#include "common/threading.h"

#include <atomic>

namespace nnk {

static std::atomic<int> g_user_threads{0};  // 0: not set
static thread_local int t_call_threads = 0;

int num_threads() {
  const int user = g_user_threads.load(std::memory_order_relaxed);
  if (user > 0) return user;
  if (t_call_threads > 0) return t_call_threads;
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_user_num_threads(int n) { g_user_threads.store(n > 0 ? n : 0, std::memory_order_relaxed); }
int user_num_threads() { return g_user_threads.load(std::memory_order_relaxed); }
void set_call_threads(int n) { t_call_threads = n; }

}  // namespace nnk
