// Batch normalization on the CPU (see batch_norm.h for the math and the plan).
//
// Two loop orders over the (N, C, S) view:
//   channel-major (NCHW, (N, C, L)): a channel is N rows of S values; with at least as many
//     channels as threads, each thread takes whole channels and runs the statistics (or the
//     gradient reduction) and then the elementwise pass on one channel before the next, so the
//     second pass reads the channel from cache: two passes over memory fused into one.
//   pixel-major (channels_last, (N, C)): each (n, s) holds C contiguous values; threads take
//     ranges of pixels, vectorise across channels and keep per-thread partial sums.
// With fewer channels than threads, channel-major work is split by rows instead (partials again).
// Sums are shifted (x - first element of the channel), accumulated in T lanes along a row and in
// float64 across rows and threads, so the result does not depend on the thread count beyond
// float64 rounding. Outputs larger than kStreamBytes are written with non-temporal stores (no
// read-for-ownership of lines that are overwritten whole).
#include "cpu/batch_norm.h"

#include <cmath>
#include <vector>

#include "common/threading.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace nnk {
namespace cpu {
namespace {

constexpr int64_t kStreamBytes = int64_t(8) << 20;

template <class T>
inline T* row_of(const View3<T>& v, int64_t n, int64_t c) {
  return v.p + n * v.sn + c * v.sc;
}

template <class T>
bool pixel_major(const View3<T>& v) {
  return v.sc == 1 && v.C > 1;
}

// ------------------------------------------------------------------------------ row kernels
// Each works on one row of S values (strides given) and vectorises along it when unit-stride:
// lane arrays instead of one accumulator so that the compiler needs no reassociation flags.

template <class T>
void row_sums(const T* __restrict x, int64_t ss, int64_t S, T shift, double* s1, double* s2) {
  T l1[8] = {}, l2[8] = {};
  int64_t i = 0;
  if (ss == 1)
    for (; i + 8 <= S; i += 8)
      for (int l = 0; l < 8; ++l) {
        const T d = x[i + l] - shift;
        l1[l] += d;
        l2[l] += d * d;
      }
  T t1 = T(0), t2 = T(0);
  for (; i < S; ++i) {
    const T d = x[i * ss] - shift;
    t1 += d;
    t2 += d * d;
  }
  double a = double(t1), b = double(t2);
  for (int l = 0; l < 8; ++l) a += double(l1[l]), b += double(l2[l]);
  *s1 += a;
  *s2 += b;
}

// sum dy and sum dy * (x - mean) along a row.
template <class T>
void row_grad_sums(const T* __restrict dy, int64_t sdy, const T* __restrict x, int64_t sx,
                   int64_t S, T mean, double* sum_dy, double* sum_dyx) {
  T l1[8] = {}, l2[8] = {};
  int64_t i = 0;
  if (sdy == 1 && sx == 1)
    for (; i + 8 <= S; i += 8)
      for (int l = 0; l < 8; ++l) {
        l1[l] += dy[i + l];
        l2[l] += dy[i + l] * (x[i + l] - mean);
      }
  T t1 = T(0), t2 = T(0);
  for (; i < S; ++i) {
    t1 += dy[i * sdy];
    t2 += dy[i * sdy] * (x[i * sx] - mean);
  }
  double a = double(t1), b = double(t2);
  for (int l = 0; l < 8; ++l) a += double(l1[l]), b += double(l2[l]);
  *sum_dy += a;
  *sum_dyx += b;
}

// y = f(i) along a row; streaming stores for unit-stride rows when `stream`.
template <class T, class F>
inline void write_row(T* __restrict y, int64_t sy, int64_t S, bool stream, F&& f) {
  if (sy != 1) {
    for (int64_t i = 0; i < S; ++i) y[i * sy] = f(i);
    return;
  }
#if defined(__SSE2__)
  if (stream) {
    constexpr int W = 16 / sizeof(T);
    int64_t i = 0;
    for (; i < S && (reinterpret_cast<uintptr_t>(y + i) & 15); ++i) y[i] = f(i);
    for (; i + W <= S; i += W) {
      alignas(16) T v[W];
      for (int l = 0; l < W; ++l) v[l] = f(i + l);
      if constexpr (sizeof(T) == 4)
        _mm_stream_ps(reinterpret_cast<float*>(y + i), _mm_load_ps(reinterpret_cast<float*>(v)));
      else
        _mm_stream_pd(reinterpret_cast<double*>(y + i), _mm_load_pd(reinterpret_cast<double*>(v)));
    }
    for (; i < S; ++i) y[i] = f(i);
    return;
  }
#endif
  for (int64_t i = 0; i < S; ++i) y[i] = f(i);
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// ------------------------------------------------------------------------------- partial sums
// Per-channel float64 sums (two per channel) for every thread, added in thread order.
struct Partials {
  int nt;
  int64_t C;
  std::vector<double> v;  // [thread][2][C]
  Partials(int threads, int64_t channels)
      : nt(threads), C(channels), v(size_t(threads) * 2 * size_t(channels), 0.0) {}
  double* a(int t) { return v.data() + size_t(t) * 2 * C; }
  double* b(int t) { return a(t) + C; }
  void total(int64_t c, double* x, double* y) const {
    double sx = 0, sy = 0;
    for (int t = 0; t < nt; ++t) {
      sx += v[size_t(t) * 2 * C + c];
      sy += v[size_t(t) * 2 * C + C + c];
    }
    *x = sx;
    *y = sy;
  }
};

inline int threads_for(int64_t work) {
  const int nt = in_parallel_region() ? 1 : num_threads();
  return work < (int64_t(1) << 15) ? 1 : nt;  // small tensors: fork/join would dominate
}

// Runs fn(tid, begin, end) over [0, n) split evenly on `nt` threads (thread ids 0..nt-1).
template <class F>
void split_threads(int64_t n, int nt, F&& fn) {
  if (nt <= 1) {
    fn(0, int64_t(0), n);
    return;
  }
  parallel_for(
      nt, 1,
      [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          int64_t b, e;
          split_range(n, nt, int(t), &b, &e);
          fn(int(t), b, e);
        }
      },
      nt);
}

// Shifted sums of every channel: s1 = sum (x - shift), s2 = sum (x - shift)^2, shift[c] = the
// channel's first element. Channel-major work is split by channels (or rows, with few channels).
template <class T>
void channel_sums(const View3<const T>& x, const T* shift, std::vector<double>* s1,
                  std::vector<double>* s2) {
  const int nt = threads_for(x.N * x.C * x.S);
  if (!pixel_major(x) && x.C >= nt) {
    parallel_for(
        x.C, 1,
        [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            double a = 0, b = 0;
            for (int64_t n = 0; n < x.N; ++n)
              row_sums(row_of(x, n, c), x.ss, x.S, shift[c], &a, &b);
            (*s1)[size_t(c)] = a;
            (*s2)[size_t(c)] = b;
          }
        },
        nt);
    return;
  }
  Partials part(nt, x.C);
  if (pixel_major(x)) {
    split_threads(x.N * x.S, nt, [&](int t, int64_t b, int64_t e) {
      double *pa = part.a(t), *pb = part.b(t);
      for (int64_t i = b; i < e; ++i) {
        const T* px = x.p + (i / x.S) * x.sn + (i % x.S) * x.ss;
        for (int64_t c = 0; c < x.C; ++c) {
          const double d = double(px[c] - shift[c]);
          pa[c] += d;
          pb[c] += d * d;
        }
      }
    });
  } else {
    split_threads(x.N, nt, [&](int t, int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n)
        for (int64_t c = 0; c < x.C; ++c)
          row_sums(row_of(x, n, c), x.ss, x.S, shift[c], &part.a(t)[c], &part.b(t)[c]);
    });
  }
  for (int64_t c = 0; c < x.C; ++c) part.total(c, &(*s1)[size_t(c)], &(*s2)[size_t(c)]);
}

template <class T>
std::vector<T> first_elements(const View3<const T>& x) {
  std::vector<T> shift(size_t(x.C));
  for (int64_t c = 0; c < x.C; ++c) shift[size_t(c)] = x.N * x.S > 0 ? x.p[c * x.sc] : T(0);
  return shift;
}

// mean and m2 = sum (x - mean)^2 from shifted sums over `count` values.
inline void finish_stats(double shift, double s1, double s2, double count, double* mean,
                         double* m2) {
  const double d = s1 / count;
  *mean = shift + d;
  *m2 = s2 - s1 * d;
  if (*m2 < 0) *m2 = 0;
}

// y = (x - center[c]) * scale[c] + shift[c] over the whole view.
template <class T>
void apply_all(const View3<const T>& x, const View3<T>& y, const T* center, const T* scale,
               const T* shift) {
  const int nt = threads_for(x.N * x.C * x.S);
  const bool stream = x.N * x.C * x.S * int64_t(sizeof(T)) >= kStreamBytes;
  if (pixel_major(x) && y.sc == 1) {
    split_threads(x.N * x.S, nt, [&](int, int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / x.S, s = i % x.S;
        const T* px = x.p + n * x.sn + s * x.ss;
        T* py = y.p + n * y.sn + s * y.ss;
        for (int64_t c = 0; c < x.C; ++c) py[c] = (px[c] - center[c]) * scale[c] + shift[c];
      }
    });
    return;
  }
  split_threads(x.N * x.C, nt, [&](int, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = i / x.C, c = i % x.C;
      const T* px = row_of(x, n, c);
      const T m = center[c], a = scale[c], o = shift[c];
      write_row(row_of(y, n, c), y.ss, x.S, stream,
                [&](int64_t k) { return (px[k * x.ss] - m) * a + o; });
    }
    if (stream) stream_fence();
  });
}

}  // namespace

// ------------------------------------------------------------------------------------ stats

template <class T>
void batch_norm_stats(View3<const T> x, T* mean, T* m2) {
  const std::vector<T> shift = first_elements(x);
  std::vector<double> s1(size_t(x.C)), s2(size_t(x.C));
  channel_sums(x, shift.data(), &s1, &s2);
  const double count = double(x.N * x.S);
  for (int64_t c = 0; c < x.C; ++c) {
    double mu, q;
    finish_stats(double(shift[size_t(c)]), s1[size_t(c)], s2[size_t(c)], count, &mu, &q);
    mean[c] = T(mu);
    m2[c] = T(q);
  }
}

template <class T>
void batch_norm_apply(View3<const T> x, View3<T> y, const T* center, const T* scale,
                      const T* shift) {
  if (center) {
    apply_all(x, y, center, scale, shift);
  } else {
    const std::vector<T> zero(size_t(x.C), T(0));
    apply_all(x, y, zero.data(), scale, shift);
  }
}

// ---------------------------------------------------------------------------- training forward

template <class T>
void batch_norm_forward_train(View3<const T> x, View3<T> y, const T* w, const T* b, double eps,
                              double momentum, T* save_mean, T* save_invstd, T* running_mean,
                              T* running_var) {
  const double count = double(x.N * x.S);
  const std::vector<T> shift = first_elements(x);
  // Channel statistics -> save_mean / save_invstd / running stats, and y = (x - mean) * a + o.
  std::vector<T> a(size_t(x.C)), o(size_t(x.C));
  auto finish = [&](int64_t c, double s1, double s2) {
    double mu, m2;
    finish_stats(double(shift[size_t(c)]), s1, s2, count, &mu, &m2);
    const double invstd = 1.0 / std::sqrt(m2 / count + eps);
    save_mean[c] = T(mu);
    save_invstd[c] = T(invstd);
    if (running_mean) running_mean[c] = T((1 - momentum) * double(running_mean[c]) + momentum * mu);
    if (running_var)
      running_var[c] = T((1 - momentum) * double(running_var[c]) +
                         momentum * (count > 1 ? m2 / (count - 1) : m2 / count));
    a[size_t(c)] = T(invstd * (w ? double(w[c]) : 1.0));
    o[size_t(c)] = b ? b[c] : T(0);
  };

  const int nt = threads_for(x.N * x.C * x.S);
  if (!pixel_major(x) && x.C >= nt) {
    // One channel at a time per thread: its statistics, then its output while still in cache.
    const bool stream = x.N * x.C * x.S * int64_t(sizeof(T)) >= kStreamBytes;
    parallel_for(
        x.C, 1,
        [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            double s1 = 0, s2 = 0;
            for (int64_t n = 0; n < x.N; ++n)
              row_sums(row_of(x, n, c), x.ss, x.S, shift[c], &s1, &s2);
            finish(c, s1, s2);
            const T mc = save_mean[c], ac = a[size_t(c)], oc = o[size_t(c)];
            for (int64_t n = 0; n < x.N; ++n) {
              const T* px = row_of(x, n, c);
              write_row(row_of(y, n, c), y.ss, x.S, stream,
                        [&](int64_t k) { return (px[k * x.ss] - mc) * ac + oc; });
            }
          }
          if (stream) stream_fence();
        },
        nt);
    return;
  }
  std::vector<double> s1(size_t(x.C)), s2(size_t(x.C));
  channel_sums(x, shift.data(), &s1, &s2);
  for (int64_t c = 0; c < x.C; ++c) finish(c, s1[size_t(c)], s2[size_t(c)]);
  apply_all(x, y, save_mean, a.data(), o.data());
}

// ----------------------------------------------------------------------------------- backward

namespace {

// sum dy and sum dy * (x - mean) of every channel (float64).
template <class T>
void grad_sums(const View3<const T>& dy, const View3<const T>& x, const T* mean,
               std::vector<double>* sdy, std::vector<double>* sdyx) {
  const int nt = threads_for(x.N * x.C * x.S);
  if (!pixel_major(x) && x.C >= nt) {
    parallel_for(
        x.C, 1,
        [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            double a = 0, b = 0;
            for (int64_t n = 0; n < x.N; ++n)
              row_grad_sums(row_of(dy, n, c), dy.ss, row_of(x, n, c), x.ss, x.S, mean[c], &a, &b);
            (*sdy)[size_t(c)] = a;
            (*sdyx)[size_t(c)] = b;
          }
        },
        nt);
    return;
  }
  Partials part(nt, x.C);
  if (pixel_major(x) && dy.sc == 1) {
    split_threads(x.N * x.S, nt, [&](int t, int64_t b, int64_t e) {
      double *pa = part.a(t), *pb = part.b(t);
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / x.S, s = i % x.S;
        const T* px = x.p + n * x.sn + s * x.ss;
        const T* pd = dy.p + n * dy.sn + s * dy.ss;
        for (int64_t c = 0; c < x.C; ++c) {
          pa[c] += double(pd[c]);
          pb[c] += double(pd[c] * (px[c] - mean[c]));
        }
      }
    });
  } else {
    split_threads(x.N, nt, [&](int t, int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n)
        for (int64_t c = 0; c < x.C; ++c)
          row_grad_sums(row_of(dy, n, c), dy.ss, row_of(x, n, c), x.ss, x.S, mean[c], &part.a(t)[c],
                        &part.b(t)[c]);
    });
  }
  for (int64_t c = 0; c < x.C; ++c) part.total(c, &(*sdy)[size_t(c)], &(*sdyx)[size_t(c)]);
}

// dx = (dy - k0[c] - (x - mean[c]) * k1[c]) * k2[c] over the whole view.
template <class T>
void grad_apply(const View3<const T>& dy, const View3<const T>& x, const T* mean, const T* k0,
                const T* k1, const T* k2, const View3<T>& dx) {
  const int nt = threads_for(x.N * x.C * x.S);
  const bool stream = x.N * x.C * x.S * int64_t(sizeof(T)) >= kStreamBytes;
  if (pixel_major(x) && dy.sc == 1 && dx.sc == 1) {
    split_threads(x.N * x.S, nt, [&](int, int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / x.S, s = i % x.S;
        const T* px = x.p + n * x.sn + s * x.ss;
        const T* pd = dy.p + n * dy.sn + s * dy.ss;
        T* po = dx.p + n * dx.sn + s * dx.ss;
        for (int64_t c = 0; c < x.C; ++c)
          po[c] = (pd[c] - k0[c] - (px[c] - mean[c]) * k1[c]) * k2[c];
      }
    });
    return;
  }
  split_threads(x.N * x.C, nt, [&](int, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = i / x.C, c = i % x.C;
      const T* px = row_of(x, n, c);
      const T* pd = row_of(dy, n, c);
      const T m = mean[c], a0 = k0[c], a1 = k1[c], a2 = k2[c];
      write_row(row_of(dx, n, c), dx.ss, x.S, stream,
                [&](int64_t k) { return (pd[k * dy.ss] - a0 - (px[k * x.ss] - m) * a1) * a2; });
    }
    if (stream) stream_fence();
  });
}

}  // namespace

template <class T>
void batch_norm_backward_reduce(View3<const T> dy, View3<const T> x, const T* mean, const T* invstd,
                                T* sum_dy, T* sum_dy_xhat) {
  std::vector<double> sdy(size_t(x.C)), sdyx(size_t(x.C));
  grad_sums(dy, x, mean, &sdy, &sdyx);
  for (int64_t c = 0; c < x.C; ++c) {
    sum_dy[c] = T(sdy[size_t(c)]);
    sum_dy_xhat[c] = T(sdyx[size_t(c)] * double(invstd[c]));
  }
}

template <class T>
void batch_norm_backward_apply(View3<const T> dy, View3<const T> x, const T* mean, const T* invstd,
                               const T* w, const T* mean_dy, const T* mean_dy_xhat, View3<T> dx) {
  // dx = (dy - mean_dy - (x - mean) * invstd * mean_dy_xhat) * invstd * w
  std::vector<T> k1(size_t(x.C)), k2(size_t(x.C));
  for (int64_t c = 0; c < x.C; ++c) {
    k1[size_t(c)] = T(double(invstd[c]) * double(mean_dy_xhat[c]));
    k2[size_t(c)] = T(double(invstd[c]) * (w ? double(w[c]) : 1.0));
  }
  grad_apply(dy, x, mean, mean_dy, k1.data(), k2.data(), dx);
}

template <class T>
void batch_norm_backward_train(View3<const T> dy, View3<const T> x, const T* mean, const T* invstd,
                               const T* w, View3<T> dx, T* dw, T* db) {
  const double count = double(x.N * x.S);
  std::vector<T> k0(size_t(x.C)), k1(size_t(x.C)), k2(size_t(x.C));
  // From the channel's sums: dw, db and the coefficients of dx.
  auto finish = [&](int64_t c, double sdy, double sdyx) {
    const double is = double(invstd[c]);
    if (dw) dw[c] = T(sdyx * is);
    if (db) db[c] = T(sdy);
    k0[size_t(c)] = T(sdy / count);
    k1[size_t(c)] = T(sdyx / count * is * is);
    k2[size_t(c)] = T(is * (w ? double(w[c]) : 1.0));
  };

  const int nt = threads_for(x.N * x.C * x.S);
  if (!pixel_major(x) && x.C >= nt) {
    // One channel at a time per thread: its gradient sums, then its dx from cache.
    const bool stream = dx.p && x.N * x.C * x.S * int64_t(sizeof(T)) >= kStreamBytes;
    parallel_for(
        x.C, 1,
        [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            double sdy = 0, sdyx = 0;
            for (int64_t n = 0; n < x.N; ++n)
              row_grad_sums(row_of(dy, n, c), dy.ss, row_of(x, n, c), x.ss, x.S, mean[c], &sdy,
                            &sdyx);
            finish(c, sdy, sdyx);
            if (!dx.p) continue;
            const T m = mean[c], a0 = k0[size_t(c)], a1 = k1[size_t(c)], a2 = k2[size_t(c)];
            for (int64_t n = 0; n < x.N; ++n) {
              const T* px = row_of(x, n, c);
              const T* pd = row_of(dy, n, c);
              write_row(row_of(dx, n, c), dx.ss, x.S, stream, [&](int64_t k) {
                return (pd[k * dy.ss] - a0 - (px[k * x.ss] - m) * a1) * a2;
              });
            }
          }
          if (stream) stream_fence();
        },
        nt);
    return;
  }
  std::vector<double> sdy(size_t(x.C)), sdyx(size_t(x.C));
  grad_sums(dy, x, mean, &sdy, &sdyx);
  for (int64_t c = 0; c < x.C; ++c) finish(c, sdy[size_t(c)], sdyx[size_t(c)]);
  if (dx.p) grad_apply(dy, x, mean, k0.data(), k1.data(), k2.data(), dx);
}

#define NNK_INSTANTIATE_BN(T)                                                                     \
  template void batch_norm_stats<T>(View3<const T>, T*, T*);                                      \
  template void batch_norm_apply<T>(View3<const T>, View3<T>, const T*, const T*, const T*);      \
  template void batch_norm_forward_train<T>(View3<const T>, View3<T>, const T*, const T*, double, \
                                            double, T*, T*, T*, T*);                              \
  template void batch_norm_backward_reduce<T>(View3<const T>, View3<const T>, const T*, const T*, \
                                              T*, T*);                                            \
  template void batch_norm_backward_apply<T>(View3<const T>, View3<const T>, const T*, const T*,  \
                                             const T*, const T*, const T*, View3<T>);             \
  template void batch_norm_backward_train<T>(View3<const T>, View3<const T>, const T*, const T*,  \
                                             const T*, View3<T>, T*, T*);
NNK_INSTANTIATE_BN(float)
NNK_INSTANTIATE_BN(double)

}  // namespace cpu
}  // namespace nnk
