// Vector math written once against Simd<T> (simd.h): exp, sigmoid and tanh for float and double.
// Include after simd.h, inside the same ISA translation unit.
//
// exp(x): Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then a polynomial in r and
// 2^n built in the exponent bits. n comes from the "magic number" rounding t = x log2e + 1.5 2^p
// (p = mantissa bits): t's low mantissa bits hold round(x log2e), which pow2_bits turns into 2^n
// without a float-to-int conversion (AVX2 has none for int64).
//   float:  Cephes expf polynomial (degree 6), within 2 ulp on [-87, 88];
//   double: Taylor series to r^13 (truncation < 1e-17 relative), within 2 ulp on [-708, 709].
// Below the lower bound the result is 0 (so exp(-inf) = 0 exactly, as softmax needs); above the
// upper bound it is clamped (callers use x <= 0); NaN in, NaN out.
#pragma once
#include <cmath>

namespace nnk {
namespace NNK_ISA_NS {

template <class T>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  static constexpr float lo = -87.0f, hi = 88.0f;
  static constexpr float magic = 12582912.0f;  // 1.5 * 2^23
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  // p(r) = 1 + r + r^2 (c0 + c1 r + ... + c5 r^5), highest power first
  static constexpr float coef[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                   4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
};

template <>
struct ExpConstants<double> {
  static constexpr double lo = -708.0, hi = 709.0;
  static constexpr double magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double ln2_hi = 6.93145751953125e-1, ln2_lo = 1.42860682030941723212e-6;
  // 1/k! for k = 13 .. 2, highest power first (then + r + 1)
  static constexpr double coef[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                                    1.0 / 3628800.0,    1.0 / 362880.0,    1.0 / 40320.0,
                                    1.0 / 5040.0,       1.0 / 720.0,       1.0 / 120.0,
                                    1.0 / 24.0,         1.0 / 6.0,         0.5};
};

template <class T>
NNK_INLINE typename Simd<T>::V vexp(typename Simd<T>::V x) {
  using S = Simd<T>;
  using K = ExpConstants<T>;
  const auto lo = S::set1(K::lo);
  // max(lo, x) / min(hi, .) keep a NaN x (it is the second operand)
  const auto xc = S::min(S::set1(K::hi), S::max(lo, x));
  const auto t = S::fma(xc, S::set1(T(1.4426950408889634)), S::set1(K::magic));
  const auto n = S::sub(t, S::set1(K::magic));
  auto r = S::fma(n, S::set1(-K::ln2_hi), xc);
  r = S::fma(n, S::set1(-K::ln2_lo), r);
  auto p = S::set1(K::coef[0]);
  constexpr int m = sizeof(K::coef) / sizeof(K::coef[0]);
#pragma GCC unroll 16
  for (int i = 1; i < m; ++i) p = S::fma(p, r, S::set1(K::coef[i]));
  p = S::fma(p, S::mul(r, r), S::add(r, S::set1(T(1))));
  return S::zero_below(x, lo, S::mul(p, S::pow2_bits(t)));
}

// sigmoid(x) = 1 / (1 + exp(-x)): no cancellation anywhere; -inf -> ~0 (exp clamps), +inf -> 1.
template <class T>
NNK_INLINE typename Simd<T>::V vsigmoid(typename Simd<T>::V x) {
  using S = Simd<T>;
  const auto one = S::set1(T(1));
  return S::div(one, S::add(one, vexp<T>(S::sub(S::zero(), x))));
}

// tanh(x): 1 - 2 / (exp(2x) + 1) loses relative precision as x -> 0 (1 - e cancels), so
// |x| < 0.625 takes Cephes' odd expansion x + x^3 P(x^2) (float: degree-4 polynomial; double:
// rational P/Q), within a few ulp; the large branch saturates to +-1 and passes NaN through.
template <class T>
NNK_INLINE typename Simd<T>::V tanh_small(typename Simd<T>::V x, typename Simd<T>::V z);

template <>
NNK_INLINE Simd<float>::V tanh_small<float>(Simd<float>::V x, Simd<float>::V z) {
  using S = Simd<float>;
  auto p = S::fma(S::set1(-5.70498872745e-3f), z, S::set1(2.06390887954e-2f));
  p = S::fma(p, z, S::set1(-5.37397155531e-2f));
  p = S::fma(p, z, S::set1(1.33314422036e-1f));
  p = S::fma(p, z, S::set1(-3.33332819422e-1f));
  return S::fma(S::mul(p, z), x, x);
}

template <>
NNK_INLINE Simd<double>::V tanh_small<double>(Simd<double>::V x, Simd<double>::V z) {
  using S = Simd<double>;
  auto p = S::fma(S::set1(-9.64399179425052238628e-1), z, S::set1(-9.92877231001918586564e1));
  p = S::fma(p, z, S::set1(-1.61468768441708447952e3));
  auto q = S::add(z, S::set1(1.12811678491632931402e2));
  q = S::fma(q, z, S::set1(2.23548839060100448583e3));
  q = S::fma(q, z, S::set1(4.84406305325125486048e3));
  return S::fma(S::mul(z, S::div(p, q)), x, x);
}

template <class T>
NNK_INLINE typename Simd<T>::V vtanh(typename Simd<T>::V x) {
  using S = Simd<T>;
  const auto one = S::set1(T(1));
  const auto large = S::sub(one, S::div(S::set1(T(2)), S::add(vexp<T>(S::add(x, x)), one)));
  return S::select_abs_lt(x, S::set1(T(0.625)), tanh_small<T>(x, S::mul(x, x)), large);
}

}  // namespace NNK_ISA_NS
}  // namespace nnk
