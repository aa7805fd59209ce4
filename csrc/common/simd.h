// SIMD mapping header (ggml-style): each kernel is written once against Simd<T> and compiled once
// per ISA, in a translation unit that defines exactly one of
//   NNK_ISA_AVX512  (compiled with -mavx512f -mavx512vl -mavx512bw -mavx512dq -mfma)
//   NNK_ISA_AVX2    (compiled with -mavx2 -mfma)
//   NNK_ISA_SCALAR  (no ISA flags: portable GCC/Clang vector extensions, SSE2 on x86-64)
// Everything lands in namespace nnk::<isa> so that inline functions and template instances built
// with different -m flags never merge at link time (an AVX-512 copy picked for the AVX2 path would
// fault on a CPU without AVX-512).
//
// Simd<T> provides: V (the register type), W (lanes), zero, set1, load, store, fma (a*b+c), mul,
// add.
#pragma once
#include <cstdint>

#if defined(NNK_ISA_AVX512) || defined(NNK_ISA_AVX2)
#include <immintrin.h>
#endif

#if defined(NNK_ISA_AVX512)
#if !defined(__AVX512F__)
#error "NNK_ISA_AVX512 translation units must be compiled with -mavx512f"
#endif
#define NNK_ISA_NS avx512
#elif defined(NNK_ISA_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__)
#error "NNK_ISA_AVX2 translation units must be compiled with -mavx2 -mfma"
#endif
#define NNK_ISA_NS avx2
#elif defined(NNK_ISA_SCALAR)
#define NNK_ISA_NS scalar
#else
#error "define one of NNK_ISA_AVX512, NNK_ISA_AVX2, NNK_ISA_SCALAR before including simd.h"
#endif

#define NNK_INLINE inline __attribute__((always_inline))

namespace nnk {
namespace NNK_ISA_NS {

template <class T>
struct Simd;

#if defined(NNK_ISA_AVX512)

template <>
struct Simd<float> {
  using V = __m512;
  static constexpr int W = 16;
  static NNK_INLINE V zero() { return _mm512_setzero_ps(); }
  static NNK_INLINE V set1(float x) { return _mm512_set1_ps(x); }
  static NNK_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static NNK_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static NNK_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static NNK_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static NNK_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
};

template <>
struct Simd<double> {
  using V = __m512d;
  static constexpr int W = 8;
  static NNK_INLINE V zero() { return _mm512_setzero_pd(); }
  static NNK_INLINE V set1(double x) { return _mm512_set1_pd(x); }
  static NNK_INLINE V load(const double* p) { return _mm512_loadu_pd(p); }
  static NNK_INLINE void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static NNK_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static NNK_INLINE V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static NNK_INLINE V add(V a, V b) { return _mm512_add_pd(a, b); }
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
  static NNK_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static NNK_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static NNK_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
};

template <>
struct Simd<double> {
  using V = __m256d;
  static constexpr int W = 4;
  static NNK_INLINE V zero() { return _mm256_setzero_pd(); }
  static NNK_INLINE V set1(double x) { return _mm256_set1_pd(x); }
  static NNK_INLINE V load(const double* p) { return _mm256_loadu_pd(p); }
  static NNK_INLINE void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static NNK_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static NNK_INLINE V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static NNK_INLINE V add(V a, V b) { return _mm256_add_pd(a, b); }
};

#else  // NNK_ISA_SCALAR: 16-byte GCC/Clang vectors (SSE2 on x86-64, NEON on aarch64)

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
  static NNK_INLINE V fma(V a, V b, V c) { return a * b + c; }
  static NNK_INLINE V mul(V a, V b) { return a * b; }
  static NNK_INLINE V add(V a, V b) { return a + b; }
};

#endif

}  // namespace NNK_ISA_NS
}  // namespace nnk
