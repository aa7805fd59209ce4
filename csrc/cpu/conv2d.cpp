// 2-D convolution on the CPU, forward + backward-data + backward-weight, all on the project's GEMM
// (cpu/gemm.h). Per image n and group g, with Cg = C/groups, Kg = K/groups, CRS = Cg*R*S:
//
//   forward          Y[n]_g (Kg x PQ)  = W_g (Kg x CRS) . col (CRS x PQ)           bias in the
//   store backward-data    dcol (CRS x PQ)   = W_g^T (CRS x Kg) . dY[n]_g (Kg x PQ), then col2im
//   (+=) backward-weight  dW_g (Kg x CRS)  += dY[n]_g (Kg x PQ) . col^T (PQ x CRS)
//
// col is im2col of x[n]_g, built in chunks of output pixels so its buffer stays bounded
// (kColBudget elements per thread) instead of 9x a large input. Pointwise convolutions (1x1,
// stride 1, no padding) skip im2col: col is x[n]_g itself, read in place by the GEMM.
// Work runs across images in parallel when there are enough of them (single-threaded GEMMs, one
// scratch area per thread), otherwise image by image with multi-threaded GEMMs.
#include "cpu/conv2d.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/threading.h"
#include "common/workspace.h"
#include "cpu/gemm.h"
#include "cpu/reduce.h"

namespace nnk {
namespace cpu {
namespace {

// Elements of im2col buffer per thread (1 MiB of float32 keeps it in L2/L3 next to the packing).
constexpr int64_t kColBudget = int64_t(1) << 18;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// The output columns q in [q0, q1) whose input column q*stride + off lies in [0, limit).
inline void valid_cols(int64_t off, int64_t stride, int64_t limit, int64_t q0, int64_t q1,
                       int64_t* lo, int64_t* hi) {
  const int64_t first = off >= 0 ? 0 : (-off + stride - 1) / stride;
  const int64_t last = limit - 1 - off < 0 ? -1 : (limit - 1 - off) / stride;  // inclusive
  *lo = max64(q0, first);
  *hi = max64(*lo, min64(q1, last + 1));
}

template <class T>
struct Geometry {
  const Conv2dShape& s;
  int64_t Cg, Kg, CRS, PQ, L;
  bool pointwise;  // 1x1, stride 1, no padding: col is x itself

  explicit Geometry(const Conv2dShape& sh)
      : s(sh),
        Cg(sh.C / sh.groups),
        Kg(sh.K / sh.groups),
        CRS(sh.C / sh.groups * sh.R * sh.S),
        PQ(sh.P * sh.Q),
        L(0),
        pointwise(sh.R == 1 && sh.S == 1 && sh.sh == 1 && sh.sw == 1 && sh.ph == 0 && sh.pw == 0) {
    // Chunk of output pixels: the whole image when its im2col fits the budget, else a multiple
    // of 16 (whole GEMM panels on every ISA).
    L = PQ;
    if (CRS > 0 && CRS * PQ > kColBudget) L = max64(16, kColBudget / CRS / 16 * 16);
    if (L > PQ) L = PQ;
  }

  // Pointwise needs x[n]_g to be a (Cg x H*W) matrix: (h, w) must flatten.
  bool pointwise_ok(const View4<const T>& x) const {
    return pointwise && (s.H <= 1 || x.s[2] == s.W * x.s[3]);
  }

  // col (CRS x len, row stride ld) = im2col of x[n]_g for output pixels [j0, j0 + len), zeros
  // where a window leaves the input. kCol2Im: the adjoint instead, x[n]_g += col2im(col) (then x
  // is the gradient being accumulated).
  template <bool kCol2Im>
  void im2col(std::conditional_t<kCol2Im, T*, const T*> xbase, const int64_t* xs, int64_t n,
              int64_t g, int64_t j0, int64_t len, T* col, int64_t ld) const {
    for (int64_t c = 0; c < Cg; ++c) {
      const int64_t chan = n * xs[0] + (g * Cg + c) * xs[1];
      for (int64_t r = 0; r < s.R; ++r)
        for (int64_t t = 0; t < s.S; ++t) {
          T* row = col + ((c * s.R + r) * s.S + t) * ld;
          const int64_t hoff = r * s.dh - s.ph, woff = t * s.dw - s.pw;
          int64_t p = j0 / s.Q, q = j0 % s.Q;
          for (int64_t done = 0; done < len; q = 0, ++p) {
            // Output columns [q, q + qn) of output row p are seg[0, qn).
            const int64_t qn = min64(s.Q - q, len - done);
            T* seg = row + done;
            done += qn;
            const int64_t ih = p * s.sh + hoff;
            int64_t lo = q, hi = q;
            if (ih >= 0 && ih < s.H) valid_cols(woff, s.sw, s.W, q, q + qn, &lo, &hi);
            if constexpr (kCol2Im) {
              for (int64_t qq = lo; qq < hi; ++qq)
                xbase[chan + ih * xs[2] + (qq * s.sw + woff) * xs[3]] += seg[qq - q];
            } else {
              fill_row(xbase, xs, chan, ih, woff, q, qn, lo, hi, seg);
            }
          }
        }
    }
  }

  // seg[0, qn) = output columns [q, q + qn): x where [lo, hi) says the window is inside, zeros
  // elsewhere.
  void fill_row(const T* xbase, const int64_t* xs, int64_t chan, int64_t ih, int64_t woff,
                int64_t q, int64_t qn, int64_t lo, int64_t hi, T* seg) const {
    for (int64_t qq = q; qq < lo; ++qq) seg[qq - q] = T(0);
    if (hi > lo) {
      const T* src = xbase + chan + ih * xs[2] + (lo * s.sw + woff) * xs[3];
      const int64_t step = s.sw * xs[3];
      if (step == 1) {
        std::memcpy(seg + (lo - q), src, size_t(hi - lo) * sizeof(T));
      } else {
        for (int64_t qq = lo; qq < hi; ++qq) seg[qq - q] = src[(qq - lo) * step];
      }
    }
    for (int64_t qq = hi; qq < q + qn; ++qq) seg[qq - q] = T(0);
  }
};

// Threads for the GEMMs of one image, and whether images run in parallel instead.
struct Split {
  int nt;       // threads available
  bool images;  // true: one image per thread at a time, single-threaded GEMMs
  int gemm_nt;  // threads per GEMM
};

inline Split split_for(int64_t N) {
  Split sp;
  sp.nt = in_parallel_region() ? 1 : num_threads();
  // Across images when they divide evenly among the threads, or are many.
  sp.images = sp.nt > 1 && N >= sp.nt && (N % sp.nt == 0 || N >= 4 * sp.nt);
  sp.gemm_nt = sp.images ? 1 : sp.nt;
  return sp;
}

// Scratch for `per_thread` elements per thread under `sp` (allocated before any parallel region).
template <class T>
T* image_scratch(const Split& sp, size_t per_thread) {
  return thread_scratch<T>(Scratch::conv, per_thread * size_t(sp.images ? sp.nt : 1) + 1);
}

// Runs body(n, tid, scratch) for n in [0, N) under `sp`; thread tid gets ws + per_thread * tid.
template <class T, class Body>
void for_each_image(int64_t N, const Split& sp, T* ws, size_t per_thread, Body body) {
  if (!sp.images) {
    for (int64_t n = 0; n < N; ++n) body(n, 0, ws);
    return;
  }
  parallel_for(
      N, 1,
      [&](int64_t b, int64_t e) {
        const int tid = thread_id();
        for (int64_t n = b; n < e; ++n) body(n, tid, ws + per_thread * size_t(tid));
      },
      sp.nt);
}

// The GEMM of image n, group g over output pixels [j0, j0+len) for each pass. Pointer fields are
// filled by the caller; the shapes and strides here are also what sizes the scratch.
template <class T>
Gemm<T> forward_gemm(const Geometry<T>& gm, const View4<const T>& w, const View4<T>& y, bool pw,
                     const View4<const T>& x, int64_t len, int64_t ld) {
  Gemm<T> g;
  g.M = gm.Kg;
  g.N = len;
  g.K = gm.CRS;
  g.rsa = w.s[0];
  g.csa = w.s[3];
  g.rsb = pw ? x.s[1] : ld;
  g.csb = pw ? x.s[3] : 1;
  g.rsc = y.s[1];
  g.csc = y.s[3];
  return g;
}

template <class T>
size_t gemm_scratch(Gemm<T> g, int nt, int64_t full, int64_t last) {
  g.N = full;
  size_t a = gemm_workspace(g, nt);
  g.N = last;
  return std::max(a, gemm_workspace(g, nt));
}

}  // namespace

// ------------------------------------------------------------------------------------ forward

template <class T>
void conv2d_forward(const Conv2dShape& s, View4<const T> x, View4<const T> w, const T* bias,
                    View4<T> y) {
  const Geometry<T> gm(s);
  if (s.N == 0 || s.K == 0 || gm.PQ == 0) return;
  const bool pw = gm.pointwise_ok(x);
  const Split sp = split_for(s.N);
  const int64_t L = pw ? gm.PQ : gm.L, last = pw ? gm.PQ : gm.PQ - (gm.PQ - 1) / L * L;
  const Gemm<T> shape = forward_gemm(gm, w, y, pw, x, L, L);
  const size_t col = pw ? 0 : size_t(gm.CRS * L);
  const size_t gws = gemm_scratch(shape, sp.gemm_nt, L, last);

  T* ws = image_scratch<T>(sp, col + gws);
  for_each_image(s.N, sp, ws, col + gws, [&](int64_t n, int, T* scratch) {
    T* colbuf = scratch;
    T* gemm_ws = scratch + col;
    for (int64_t g = 0; g < s.groups; ++g)
      for (int64_t j0 = 0; j0 < gm.PQ; j0 += L) {
        const int64_t len = min64(L, gm.PQ - j0);
        Gemm<T> gg = shape;
        gg.N = len;
        gg.A = w.p + g * gm.Kg * w.s[0];
        if (pw) {
          gg.B = x.p + n * x.s[0] + g * gm.Cg * x.s[1];
        } else {
          gm.template im2col<false>(x.p, x.s, n, g, j0, len, colbuf, L);
          gg.B = colbuf;
        }
        gg.C = y.p + n * y.s[0] + g * gm.Kg * y.s[1] + j0 * y.s[3];
        gg.bias_m = bias ? bias + g * gm.Kg : nullptr;
        gemm(gg, sp.gemm_nt, gemm_ws);
      }
  });
}

// ------------------------------------------------------------------------------ backward data

template <class T>
void conv2d_backward_data(const Conv2dShape& s, View4<const T> dy, View4<const T> w, View4<T> dx) {
  const Geometry<T> gm(s);
  if (s.N == 0 || s.C == 0) return;
  const View4<const T> dxc{dx.p, {dx.s[0], dx.s[1], dx.s[2], dx.s[3]}};
  const bool pw = gm.pointwise_ok(dxc) && gm.Kg > 0;
  const Split sp = split_for(s.N);
  const int64_t L = pw ? gm.PQ : max64(gm.L, 1), last = pw ? gm.PQ : gm.PQ - (gm.PQ - 1) / L * L;

  // A = W_g^T (CRS x Kg), B = dY[n]_g (Kg x len), C = dcol (CRS x len) or dX[n]_g (pointwise).
  Gemm<T> shape;
  shape.M = gm.CRS;
  shape.K = gm.Kg;
  shape.rsa = w.s[3];
  shape.csa = w.s[0];
  shape.rsb = dy.s[1];
  shape.csb = dy.s[3];
  shape.rsc = pw ? dx.s[1] : L;
  shape.csc = pw ? dx.s[3] : 1;
  const size_t col = pw ? 0 : size_t(gm.CRS * L);
  const size_t gws = gm.PQ ? gemm_scratch(shape, sp.gemm_nt, L, last) : 0;

  T* ws = image_scratch<T>(sp, col + gws);
  for_each_image(s.N, sp, ws, col + gws, [&](int64_t n, int, T* scratch) {
    T* dcol = scratch;
    T* gemm_ws = scratch + col;
    for (int64_t g = 0; g < s.groups; ++g) {
      T* dxg = dx.p + n * dx.s[0] + g * gm.Cg * dx.s[1];
      if (!pw) {  // col2im accumulates: start from zero (pixels no window touches stay zero)
        for (int64_t c = 0; c < gm.Cg; ++c)
          for (int64_t h = 0; h < s.H; ++h)
            for (int64_t x = 0; x < s.W; ++x) dxg[c * dx.s[1] + h * dx.s[2] + x * dx.s[3]] = T(0);
      }
      for (int64_t j0 = 0; j0 < gm.PQ; j0 += L) {
        const int64_t len = min64(L, gm.PQ - j0);
        Gemm<T> gg = shape;
        gg.N = len;
        gg.A = w.p + g * gm.Kg * w.s[0];
        gg.B = dy.p + n * dy.s[0] + g * gm.Kg * dy.s[1] + j0 * dy.s[3];
        gg.C = pw ? dxg : dcol;
        gemm(gg, sp.gemm_nt, gemm_ws);
        if (!pw) gm.template im2col<true>(dx.p, dx.s, n, g, j0, len, dcol, L);
      }
    }
  });
}

// ---------------------------------------------------------------------------- backward weight

template <class T>
void conv2d_backward_weight(const Conv2dShape& s, View4<const T> x, View4<const T> dy, View4<T> dw,
                            T* dbias) {
  const Geometry<T> gm(s);
  if (dbias) sum_channels(s.N, s.K, gm.PQ, dy.p, dy.s[0], dy.s[1], dy.s[3], dbias);
  if (s.K == 0 || gm.CRS == 0) return;
  const bool pw = gm.pointwise_ok(x);
  const Split sp = split_for(s.N);
  const int64_t L = pw ? gm.PQ : max64(gm.L, 1), last = pw ? gm.PQ : gm.PQ - (gm.PQ - 1) / L * L;
  // Each thread sums its images into its own (K x CRS) partial when images run in parallel;
  // otherwise straight into dw.
  const bool partials = sp.images;
  const int64_t ldp = gm.CRS;

  // A = dY[n]_g (Kg x len), B = col^T (len x CRS) or X[n]_g^T (pointwise), C = dW_g (Kg x CRS).
  Gemm<T> shape;
  shape.M = gm.Kg;
  shape.N = gm.CRS;
  shape.rsa = dy.s[1];
  shape.csa = dy.s[3];
  shape.rsb = pw ? x.s[3] : 1;
  shape.csb = pw ? x.s[1] : L;
  shape.rsc = partials ? ldp : dw.s[0];
  shape.csc = partials ? 1 : dw.s[3];
  const size_t col = pw ? 0 : size_t(gm.CRS * L);
  const size_t part = partials ? size_t(s.K * ldp) : 0;
  size_t gws = 0;
  if (gm.PQ) {
    Gemm<T> a = shape, b = shape;
    a.K = L;
    b.K = last;
    gws = std::max(gemm_workspace(a, sp.gemm_nt), gemm_workspace(b, sp.gemm_nt));
  }
  const size_t per = col + part + gws;
  std::vector<char> used(size_t(sp.nt), 0);  // threads that wrote their partial

  auto zero_dw = [&](T* p, int64_t rs, int64_t cs) {
    for (int64_t k = 0; k < s.K; ++k)
      for (int64_t j = 0; j < gm.CRS; ++j) p[k * rs + j * cs] = T(0);
  };
  if (!partials) zero_dw(dw.p, dw.s[0], dw.s[3]);

  T* ws = image_scratch<T>(sp, per);
  for_each_image(s.N, sp, ws, per, [&](int64_t n, int tid, T* scratch) {
    T* colbuf = scratch;
    T* mine = scratch + col;
    T* gemm_ws = scratch + col + part;
    if (partials && !used[size_t(tid)]) {
      zero_dw(mine, ldp, 1);
      used[size_t(tid)] = 1;
    }
    for (int64_t g = 0; g < s.groups; ++g)
      for (int64_t j0 = 0; j0 < gm.PQ; j0 += L) {
        const int64_t len = min64(L, gm.PQ - j0);
        Gemm<T> gg = shape;
        gg.K = len;
        gg.A = dy.p + n * dy.s[0] + g * gm.Kg * dy.s[1] + j0 * dy.s[3];
        if (pw) {
          gg.B = x.p + n * x.s[0] + g * gm.Cg * x.s[1];
        } else {
          gm.template im2col<false>(x.p, x.s, n, g, j0, len, colbuf, L);
          gg.B = colbuf;
        }
        gg.C = partials ? mine + g * gm.Kg * ldp : dw.p + g * gm.Kg * dw.s[0];
        gg.beta = T(1);
        gemm(gg, sp.gemm_nt, gemm_ws);
      }
  });

  if (partials) {
    // dw = the threads' partials, added in thread order.
    zero_dw(dw.p, dw.s[0], dw.s[3]);
    for (int t = 0; t < sp.nt; ++t) {
      if (!used[size_t(t)]) continue;
      const T* part_t = ws + per * t + col;
      parallel_for(s.K, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t j = 0; j < gm.CRS; ++j)
            dw.p[k * dw.s[0] + j * dw.s[3]] += part_t[k * ldp + j];
      });
    }
  }
}

#define NNK_INSTANTIATE_CONV(T)                                                                 \
  template void conv2d_forward<T>(const Conv2dShape&, View4<const T>, View4<const T>, const T*, \
                                  View4<T>);                                                    \
  template void conv2d_backward_data<T>(const Conv2dShape&, View4<const T>, View4<const T>,     \
                                        View4<T>);                                              \
  template void conv2d_backward_weight<T>(const Conv2dShape&, View4<const T>, View4<const T>,   \
                                          View4<T>, T*);
NNK_INSTANTIATE_CONV(float)
NNK_INSTANTIATE_CONV(double)

}  // namespace cpu
}  // namespace nnk
