// Thread count and a parallel-for for the CPU kernels. OpenMP when the build has it, one thread
// otherwise. The count follows torch.get_num_threads() (read at every kernel call by the binding
// layer's run(), bindings/binding.h) unless the user calls nnkernels.set_num_threads(n).
#pragma once
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace nnk {

// The threads a kernel uses: the user's count when set, else torch's count for this call, else
// OpenMP's default.
int num_threads();
// nnkernels.set_num_threads: n >= 1 fixes the count; 0 follows torch again.
void set_user_num_threads(int n);
int user_num_threads();  // 0: not set
// torch's count for the kernel call running on this thread (0: none).
void set_call_threads(int n);

inline int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline bool in_parallel_region() {
#if defined(_OPENMP)
  return omp_in_parallel();
#else
  return false;
#endif
}

// Split [0, n) into `parts` contiguous chunks; chunk `i` is [*begin, *end).
inline void split_range(int64_t n, int parts, int i, int64_t* begin, int64_t* end) {
  const int64_t q = n / parts, r = n % parts;
  *begin = i * q + (i < r ? i : r);
  *end = *begin + q + (i < r ? 1 : 0);
}

// Runs fn(begin, end) over [0, n) split into chunks of at least `grain` items, on at most
// `max_threads` threads (0 = num_threads()). Runs inline when already inside a parallel region.
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& fn, int max_threads = 0) {
  if (n <= 0) return;
  int nt = max_threads > 0 ? max_threads : num_threads();
  const int64_t by_grain = (n + grain - 1) / (grain > 0 ? grain : 1);
  if (by_grain < nt) nt = static_cast<int>(by_grain);
  if (nt <= 1 || in_parallel_region()) {
    fn(int64_t(0), n);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt)
  {
    int64_t b, e;
    split_range(n, omp_get_num_threads(), omp_get_thread_num(), &b, &e);
    if (b < e) fn(b, e);
  }
#else
  fn(int64_t(0), n);
#endif
}

// Runs fn(tid, team) once on each thread of one parallel region of `nt` threads, tid < team.
// team_barrier(team) inside fn synchronises them. team is the size OpenMP granted: a short team
// (OMP_THREAD_LIMIT, dynamic teams) may be smaller than nt; 1 inside a parallel region.
template <class F>
void team_run(int nt, F&& fn) {
  if (nt <= 1 || in_parallel_region()) {
    fn(0, 1);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt)
  fn(omp_get_thread_num(), omp_get_num_threads());
#else
  fn(0, 1);
#endif
}

inline void team_barrier(int team) {
#if defined(_OPENMP)
  if (team > 1) {
#pragma omp barrier
  }
#endif
}

}  // namespace nnk
