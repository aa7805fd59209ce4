// SIMD mapping header (ggml-style): each kernel is written once against Simd<T> and compiled once
// per ISA. CMake compiles every source that includes this header once per path with
// -DNNK_ISA=<path> and that path's flags (CMakeLists.txt, common/isa.h):
//   avx512    -mavx512f -mavx512vl -mavx512bw -mavx512dq -mfma
//   avx2      -mavx2 -mfma
//   baseline  no ISA flags: portable GCC/Clang 16-byte vectors (SSE2 on x86-64, NEON on aarch64)
// The loops land in namespace nnk::<path> (NNK_ISA_NS) so that inline functions and template
// instances built with different -m flags never merge at link time (an AVX-512 copy picked for the
// AVX2 path would fault on a CPU without AVX-512). For the same reason the per-path code uses no
// out-of-line templates shared with other translation units (std::vector, std::copy, ...): only
// what lives in nnk::<path>, plain libm calls and always-inlined helpers. The code a source
// compiles once (its driver) sits under `#if NNK_BASELINE_PASS`.
//
// Simd<T> provides: V (the register type), W (lanes), zero, set1, load, store, stream (a
// non-temporal store to a sizeof(V)-aligned address), fma (a*b+c), mul, add, sub, max / min
// (x86 semantics: max(a, b) = a > b ? a : b, so a NaN in b comes through), div,
// select_abs_lt(x, lim, a, b) (a where |x| < lim, else b; NaN x gives b), zero_below(x, lo, r)
// (r where x >= lo or x is NaN, else 0) and pow2_bits(t) (2^n, for t = n + magic as in exp(),
// simd_math.h), load_part(p, n, fill) (the first n < W lanes from p, the rest fill; no read past
// p + n), reduce_add and reduce_max (across the lanes, as a tree) and reduce_add_f64 (the lanes
// widened to float64, then added as a tree). On AVX2 and AVX-512,
// BlockTranspose<T> transposes TB x TB blocks (8x8 float, 4x4 double) with 256-bit shuffles: the
// AVX-512 unit uses the very same code as the AVX2 one.
#pragma once
#include <cstdint>
#include <type_traits>

#define NNK_ISA_LEVEL_baseline 0
#define NNK_ISA_LEVEL_avx2 1
#define NNK_ISA_LEVEL_avx512 2
#define NNK_ISA_CAT2(a, b) a##b
#define NNK_ISA_CAT(a, b) NNK_ISA_CAT2(a, b)
#if !defined(NNK_ISA)
#error "SIMD sources are compiled once per ISA by CMake with -DNNK_ISA=baseline|avx2|avx512"
#endif
#define NNK_ISA_NS NNK_ISA
#define NNK_ISA_LEVEL NNK_ISA_CAT(NNK_ISA_LEVEL_, NNK_ISA)
// The pass that also compiles the source's ISA-neutral code (once per build).
#define NNK_BASELINE_PASS (NNK_ISA_LEVEL == 0)

#if NNK_ISA_LEVEL == 2
#if !defined(__AVX512F__)
#error "the avx512 pass must be compiled with -mavx512f"
#endif
#define NNK_ISA_AVX512 1
#elif NNK_ISA_LEVEL == 1
#if !defined(__AVX2__) || !defined(__FMA__)
#error "the avx2 pass must be compiled with -mavx2 -mfma"
#endif
#define NNK_ISA_AVX2 1
#elif NNK_ISA_LEVEL == 0
#define NNK_ISA_BASELINE 1
#else
#error "NNK_ISA must be baseline, avx2 or avx512"
#endif

#if defined(NNK_ISA_AVX512) || defined(NNK_ISA_AVX2)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

#define NNK_INLINE inline __attribute__((always_inline))

// In a per-ISA section: defines table_fn<T>() in this pass's namespace, returning the constexpr
// Table<T> that Loops<T>::table() builds, for float and double. The driver declares it with
// NNK_PER_ISA and calls it with NNK_ISA_CALL (common/isa.h).
#define NNK_ISA_TABLE(table_fn, Table, Loops)        \
  template <class T>                                 \
  const Table<T>& table_fn() {                       \
    static constexpr Table<T> k = Loops<T>::table(); \
    return k;                                        \
  }                                                  \
  template const Table<float>& table_fn<float>();    \
  template const Table<double>& table_fn<double>();

namespace nnk {
namespace NNK_ISA_NS {

template <class T>
struct Simd;

// std::min / std::max for the per-ISA code (see the top of this file: no std templates there).
template <class T>
NNK_INLINE T lo(T a, T b) {
  return b < a ? b : a;
}
template <class T>
NNK_INLINE T hi(T a, T b) {
  return a < b ? b : a;
}

#if defined(NNK_ISA_AVX512)

template <>
struct Simd<float> {
  using V = __m512;
  static constexpr int W = 16;
  static NNK_INLINE V zero() { return _mm512_setzero_ps(); }
  static NNK_INLINE V set1(float x) { return _mm512_set1_ps(x); }
  static NNK_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static NNK_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static NNK_INLINE void stream(float* p, V v) { _mm512_stream_ps(p, v); }
  static NNK_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static NNK_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static NNK_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
  static NNK_INLINE V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static NNK_INLINE V max(V a, V b) { return _mm512_max_ps(a, b); }
  static NNK_INLINE V min(V a, V b) { return _mm512_min_ps(a, b); }
  static NNK_INLINE V div(V a, V b) { return _mm512_div_ps(a, b); }
  static NNK_INLINE V select_abs_lt(V x, V lim, V a, V b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(x), lim, _CMP_LT_OQ), b, a);
  }
  static NNK_INLINE V zero_below(V x, V lo, V r) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), r);
  }
  static NNK_INLINE V pow2_bits(V t) {
    const __m512i e = _mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static NNK_INLINE V load_part(const float* p, int n, float fill) {
    return _mm512_mask_loadu_ps(set1(fill), __mmask16((1u << n) - 1), p);
  }
  static NNK_INLINE float reduce_add(V v) { return _mm512_reduce_add_ps(v); }
  static NNK_INLINE float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
  static NNK_INLINE double reduce_add_f64(V v) {
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi =
        _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
  }
};

template <>
struct Simd<double> {
  using V = __m512d;
  static constexpr int W = 8;
  static NNK_INLINE V zero() { return _mm512_setzero_pd(); }
  static NNK_INLINE V set1(double x) { return _mm512_set1_pd(x); }
  static NNK_INLINE V load(const double* p) { return _mm512_loadu_pd(p); }
  static NNK_INLINE void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static NNK_INLINE void stream(double* p, V v) { _mm512_stream_pd(p, v); }
  static NNK_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static NNK_INLINE V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static NNK_INLINE V add(V a, V b) { return _mm512_add_pd(a, b); }
  static NNK_INLINE V sub(V a, V b) { return _mm512_sub_pd(a, b); }
  static NNK_INLINE V max(V a, V b) { return _mm512_max_pd(a, b); }
  static NNK_INLINE V min(V a, V b) { return _mm512_min_pd(a, b); }
  static NNK_INLINE V div(V a, V b) { return _mm512_div_pd(a, b); }
  static NNK_INLINE V select_abs_lt(V x, V lim, V a, V b) {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(_mm512_abs_pd(x), lim, _CMP_LT_OQ), b, a);
  }
  static NNK_INLINE V zero_below(V x, V lo, V r) {
    return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(x, lo, _CMP_NLT_UQ), r);
  }
  static NNK_INLINE V pow2_bits(V t) {
    const __m512i e = _mm512_add_epi64(_mm512_castpd_si512(t), _mm512_set1_epi64(1023));
    return _mm512_castsi512_pd(_mm512_slli_epi64(e, 52));
  }
  static NNK_INLINE V load_part(const double* p, int n, double fill) {
    return _mm512_mask_loadu_pd(set1(fill), __mmask8((1u << n) - 1), p);
  }
  static NNK_INLINE double reduce_add(V v) { return _mm512_reduce_add_pd(v); }
  static NNK_INLINE double reduce_max(V v) { return _mm512_reduce_max_pd(v); }
  static NNK_INLINE double reduce_add_f64(V v) { return reduce_add(v); }
};

#elif defined(NNK_ISA_AVX2)

template <>
struct Simd<float> {
  using V = __m256;
  static constexpr int W = 8;
  static NNK_INLINE V zero() { return _mm256_setzero_ps(); }
  static NNK_INLINE V set1(float x) { return _mm256_set1_ps(x); }
  static NNK_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static NNK_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static NNK_INLINE void stream(float* p, V v) { _mm256_stream_ps(p, v); }
  static NNK_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static NNK_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static NNK_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  static NNK_INLINE V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static NNK_INLINE V max(V a, V b) { return _mm256_max_ps(a, b); }
  static NNK_INLINE V min(V a, V b) { return _mm256_min_ps(a, b); }
  static NNK_INLINE V div(V a, V b) { return _mm256_div_ps(a, b); }
  static NNK_INLINE V select_abs_lt(V x, V lim, V a, V b) {
    const V ax = _mm256_andnot_ps(set1(-0.0), x);
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(ax, lim, _CMP_LT_OQ));
  }
  static NNK_INLINE V zero_below(V x, V lo, V r) {
    return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), r);
  }
  static NNK_INLINE V pow2_bits(V t) {
    const __m256i e = _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static NNK_INLINE V load_part(const float* p, int n, float fill) {
    const __m256i m =
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_blendv_ps(set1(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  }
  static NNK_INLINE float reduce_add(V v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
  }
  static NNK_INLINE float reduce_max(V v) {
    __m128 r = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
  }
  static NNK_INLINE double reduce_add_f64(V v) {
    const __m256d d = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                                    _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    const __m128d r = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
    return _mm_cvtsd_f64(_mm_add_sd(r, _mm_unpackhi_pd(r, r)));
  }
};

template <>
struct Simd<double> {
  using V = __m256d;
  static constexpr int W = 4;
  static NNK_INLINE V zero() { return _mm256_setzero_pd(); }
  static NNK_INLINE V set1(double x) { return _mm256_set1_pd(x); }
  static NNK_INLINE V load(const double* p) { return _mm256_loadu_pd(p); }
  static NNK_INLINE void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static NNK_INLINE void stream(double* p, V v) { _mm256_stream_pd(p, v); }
  static NNK_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static NNK_INLINE V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static NNK_INLINE V add(V a, V b) { return _mm256_add_pd(a, b); }
  static NNK_INLINE V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static NNK_INLINE V max(V a, V b) { return _mm256_max_pd(a, b); }
  static NNK_INLINE V min(V a, V b) { return _mm256_min_pd(a, b); }
  static NNK_INLINE V div(V a, V b) { return _mm256_div_pd(a, b); }
  static NNK_INLINE V select_abs_lt(V x, V lim, V a, V b) {
    const V ax = _mm256_andnot_pd(set1(-0.0), x);
    return _mm256_blendv_pd(b, a, _mm256_cmp_pd(ax, lim, _CMP_LT_OQ));
  }
  static NNK_INLINE V zero_below(V x, V lo, V r) {
    return _mm256_andnot_pd(_mm256_cmp_pd(x, lo, _CMP_LT_OQ), r);
  }
  static NNK_INLINE V pow2_bits(V t) {
    const __m256i e = _mm256_add_epi64(_mm256_castpd_si256(t), _mm256_set1_epi64x(1023));
    return _mm256_castsi256_pd(_mm256_slli_epi64(e, 52));
  }
  static NNK_INLINE V load_part(const double* p, int n, double fill) {
    const __m256i m = _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
    return _mm256_blendv_pd(set1(fill), _mm256_maskload_pd(p, m), _mm256_castsi256_pd(m));
  }
  static NNK_INLINE double reduce_add(V v) {
    const __m128d r = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(r, _mm_unpackhi_pd(r, r)));
  }
  static NNK_INLINE double reduce_max(V v) {
    const __m128d r = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_max_sd(r, _mm_unpackhi_pd(r, r)));
  }
  static NNK_INLINE double reduce_add_f64(V v) { return reduce_add(v); }
};

#endif

#if defined(NNK_ISA_AVX512) || defined(NNK_ISA_AVX2)
#define NNK_HAVE_BLOCK_TRANSPOSE 1

// dst[j*ldd + i] = src[i*lds + j] for i < ROWS (<= TB; missing rows read as zero) and j < TB.
// With ROWS < TB each dst row gets ROWS values by 4/2/1-lane stores (masked stores are microcoded
// and slow on AMD).
template <class T>
struct BlockTranspose;

// The first n lanes of v to p (no masks: pieces of 4, 2 and 1 lanes from the two 128-bit halves).
template <int n>
NNK_INLINE void store_first(float* p, __m256 v) {
  static_assert(n >= 1 && n <= 8, "lanes");
  if constexpr (n == 8) {
    _mm256_storeu_ps(p, v);
  } else {
    __m128 part = _mm256_castps256_ps128(v);
    if constexpr (n >= 4) {
      _mm_storeu_ps(p, part);
      part = _mm256_extractf128_ps(v, 1);
      p += 4;
    }
    constexpr int rest = n % 4;
    if constexpr (rest >= 2) {
      _mm_storel_pi(reinterpret_cast<__m64*>(p), part);
      part = _mm_movehl_ps(part, part);
      p += 2;
    }
    if constexpr (rest % 2) _mm_store_ss(p, part);
  }
}

template <int n>
NNK_INLINE void store_first(double* p, __m256d v) {
  static_assert(n >= 1 && n <= 4, "lanes");
  if constexpr (n == 4) {
    _mm256_storeu_pd(p, v);
  } else {
    __m128d part = _mm256_castpd256_pd128(v);
    if constexpr (n >= 2) {
      _mm_storeu_pd(p, part);
      part = _mm256_extractf128_pd(v, 1);
      p += 2;
    }
    if constexpr (n % 2) _mm_store_sd(p, part);
  }
}

template <>
struct BlockTranspose<float> {
  static constexpr int TB = 8;
  template <int ROWS>
  static NNK_INLINE void run(const float* src, int64_t lds, float* dst, int64_t ldd) {
    static_assert(ROWS >= 1 && ROWS <= 8, "rows per block");
    __m256 r[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
      r[i] = i < ROWS ? _mm256_loadu_ps(src + i * lds) : _mm256_setzero_ps();
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 out[8] = {
        _mm256_permute2f128_ps(s0, s4, 0x20), _mm256_permute2f128_ps(s1, s5, 0x20),
        _mm256_permute2f128_ps(s2, s6, 0x20), _mm256_permute2f128_ps(s3, s7, 0x20),
        _mm256_permute2f128_ps(s0, s4, 0x31), _mm256_permute2f128_ps(s1, s5, 0x31),
        _mm256_permute2f128_ps(s2, s6, 0x31), _mm256_permute2f128_ps(s3, s7, 0x31)};
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) store_first<ROWS>(dst + j * ldd, out[j]);
  }
};

template <>
struct BlockTranspose<double> {
  static constexpr int TB = 4;
  template <int ROWS>
  static NNK_INLINE void run(const double* src, int64_t lds, double* dst, int64_t ldd) {
    static_assert(ROWS >= 1 && ROWS <= 4, "rows per block");
    __m256d r[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
      r[i] = i < ROWS ? _mm256_loadu_pd(src + i * lds) : _mm256_setzero_pd();
    const __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
    const __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
    const __m256d out[4] = {
        _mm256_permute2f128_pd(t0, t2, 0x20), _mm256_permute2f128_pd(t1, t3, 0x20),
        _mm256_permute2f128_pd(t0, t2, 0x31), _mm256_permute2f128_pd(t1, t3, 0x31)};
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) store_first<ROWS>(dst + j * ldd, out[j]);
  }
};

#else  // baseline: 16-byte GCC/Clang vectors (SSE2 on x86-64, NEON on aarch64)

template <class T>
struct Simd {
  typedef T V __attribute__((vector_size(16)));
  static constexpr int W = 16 / sizeof(T);
  static NNK_INLINE V zero() { return V{}; }
  static NNK_INLINE V set1(T x) { return V{} + x; }
  static NNK_INLINE V load(const T* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
  static NNK_INLINE void store(T* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
  static NNK_INLINE void stream(T* p, V v) {
#if defined(__SSE2__)
    if constexpr (sizeof(T) == 4)
      _mm_stream_ps(reinterpret_cast<float*>(p), reinterpret_cast<__m128>(v));
    else
      _mm_stream_pd(reinterpret_cast<double*>(p), reinterpret_cast<__m128d>(v));
#else
    store(p, v);
#endif
  }
  static NNK_INLINE V fma(V a, V b, V c) { return a * b + c; }
  static NNK_INLINE V mul(V a, V b) { return a * b; }
  static NNK_INLINE V add(V a, V b) { return a + b; }
  static NNK_INLINE V sub(V a, V b) { return a - b; }
  static NNK_INLINE V max(V a, V b) { return a > b ? a : b; }
  static NNK_INLINE V min(V a, V b) { return a < b ? a : b; }
  static NNK_INLINE V div(V a, V b) { return a / b; }
  static NNK_INLINE V select_abs_lt(V x, V lim, V a, V b) { return (x < lim) & (-lim < x) ? a : b; }
  static NNK_INLINE V zero_below(V x, V lo, V r) { return x < lo ? V{} : r; }
  // The integer lanes of T's width: 2^n = (bits(t) + bias) << mantissa bits.
  static NNK_INLINE V pow2_bits(V t) {
    using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
    typedef I IV __attribute__((vector_size(16)));
    constexpr int mant = sizeof(T) == 4 ? 23 : 52;
    constexpr I bias = sizeof(T) == 4 ? 127 : 1023;
    IV e;
    __builtin_memcpy(&e, &t, sizeof(V));
    e = (e + bias) << mant;
    V r;
    __builtin_memcpy(&r, &e, sizeof(V));
    return r;
  }
  static NNK_INLINE V load_part(const T* p, int n, T fill) {
    V v = set1(fill);
    for (int l = 0; l < n; ++l) v[l] = p[l];
    return v;
  }
  static NNK_INLINE T reduce_add(V v) {
    T s = v[0];
    for (int l = 1; l < W; ++l) s += v[l];
    return s;
  }
  static NNK_INLINE T reduce_max(V v) {
    T m = v[0];
    for (int l = 1; l < W; ++l) m = v[l] > m ? v[l] : m;
    return m;
  }
  static NNK_INLINE double reduce_add_f64(V v) {
    double s = double(v[0]);
    for (int l = 1; l < W; ++l) s += double(v[l]);
    return s;
  }
};

#endif

}  // namespace NNK_ISA_NS
}  // namespace nnk
