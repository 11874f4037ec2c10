// Vector and conversion helpers for the per-ISA kernels. Everything here lives in namespace
// gdn::GDN_ISA so that each ISA's copy of these inline functions stays distinct at link time.
// Vectors are GCC/Clang vector extensions: the same source becomes AVX-512, AVX2 or SSE/NEON code
// depending on the flags the including file is compiled with.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) && (defined(__AVX2__) || defined(__AVX512F__))
#include <immintrin.h>
#endif

#include "common/params.h"

#ifndef GDN_ISA
#error "GDN_ISA must name the ISA this file is compiled for"
#endif

namespace gdn {
namespace GDN_ISA {

#if defined(__AVX512F__)
constexpr int kVecWidth = 16;
#elif defined(__AVX2__)
constexpr int kVecWidth = 8;
#else
constexpr int kVecWidth = 4;
#endif

typedef float vfloat __attribute__((vector_size(kVecWidth * sizeof(float))));
typedef float vfloat_unaligned __attribute__((vector_size(kVecWidth * sizeof(float)), aligned(4)));

inline vfloat vload(const float* p) { return *reinterpret_cast<const vfloat_unaligned*>(p); }
inline void vstore(float* p, vfloat x) { *reinterpret_cast<vfloat_unaligned*>(p) = x; }
// (vfloat{} + x would cost a scalar add: 0 + x is not x for x = -0.)
inline vfloat vbroadcast(float x) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_set1_ps(x);
#elif defined(__AVX2__)
  const __m256 v = _mm256_set1_ps(x);
#else
  const vfloat v = {x, x, x, x};
#endif
  return reinterpret_cast<const vfloat&>(v);
}

// exp(x) for a vector (Cephes' expf: range reduction to [-ln2/2, ln2/2], degree-6 polynomial,
// scaling by 2^n through the exponent bits; ~1 ulp). Inputs are clamped to [-87.3, 88.3], so the
// result is never inf and underflows to ~1e-38 rather than 0.
inline vfloat vexp(vfloat x) {
  typedef int32_t vint __attribute__((vector_size(kVecWidth * sizeof(int32_t))));
  x = x < vbroadcast(88.3f) ? x : vbroadcast(88.3f);
  x = x > vbroadcast(-87.3f) ? x : vbroadcast(-87.3f);
  const vfloat magic = vbroadcast(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat t = x * 1.44269504088896341f + magic;
  const vfloat n = t - magic;
  const vint ni = reinterpret_cast<const vint&>(t) - reinterpret_cast<const vint&>(magic);
  const vfloat r = x - n * 0.693359375f - n * -2.12194440e-4f;
  vfloat p = vbroadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const vint bits = reinterpret_cast<const vint&>(p) + (ni << 23);
  return reinterpret_cast<const vfloat&>(bits);
}

inline vfloat vsilu(vfloat x) { return x / (1.f + vexp(-x)); }

// Storage types. bf16 is handled as raw bits (portable, vectorises as shifts); fp16 uses the
// compiler's _Float16 (F16C/AVX512-FP16 instructions where the ISA has them).
struct bf16_t {
  uint16_t bits;
};
using half_t = _Float16;

inline float to_float(float x) { return x; }
inline float to_float(half_t x) { return static_cast<float>(x); }
inline float to_float(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <class T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline half_t from_float<half_t>(float x) { return static_cast<half_t>(x); }
template <>
inline bf16_t from_float<bf16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}


// Whole-vector loads/stores that convert between the storage type and fp32 in registers.
typedef uint32_t vuint __attribute__((vector_size(kVecWidth * sizeof(uint32_t))));
typedef uint32_t vuint_unaligned __attribute__((vector_size(kVecWidth * sizeof(uint32_t)), aligned(4)));
typedef uint16_t vushort_unaligned __attribute__((vector_size(kVecWidth * sizeof(uint16_t)), aligned(2)));

inline vfloat vload_float(const float* p) { return vload(p); }
inline void vstore_float(float* p, vfloat x) { vstore(p, x); }

// bf16 <-> fp32: widen and shift; round to nearest even on the way back (NaN stays NaN).
inline vfloat vload_float(const bf16_t* p) {
#if defined(__AVX512F__)
  const __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif defined(__AVX2__)
  const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  const vuint u = __builtin_convertvector(*reinterpret_cast<const vushort_unaligned*>(p), vuint) << 16;
#endif
  return reinterpret_cast<const vfloat&>(u);
}
// fp32 -> bf16 bits (round to nearest even, NaN stays NaN) in the low half of each 32-bit lane.
inline vuint bf16_bits(vfloat x) {
  const vuint u = reinterpret_cast<const vuint&>(x);
  const vuint rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vuint is_nan = (vuint)((u & 0x7fffffffu) > 0x7f800000u);
  return (rounded & ~is_nan) | (((u >> 16) | 0x40u) & is_nan);
}

inline void vstore_float(bf16_t* p, vfloat x) {
#if defined(__AVX512BF16__)
  // One instruction (round to nearest even, NaN kept) instead of the integer sequence below.
  const __m256bh h = _mm512_cvtneps_pbh(reinterpret_cast<const __m512&>(x));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<const __m256i&>(h));
  return;
#endif
  const vuint bits = bf16_bits(x);
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(reinterpret_cast<const __m512i&>(bits)));
#elif defined(__AVX2__)
  const __m256i r = reinterpret_cast<const __m256i&>(bits);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
#else
  for (int i = 0; i < kVecWidth; ++i) p[i].bits = static_cast<uint16_t>(bits[i]);
#endif
}

inline vfloat vload_float(const half_t* p) {
#if defined(__AVX512F__)
  const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__) && defined(__AVX2__)
  const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vfloat x;
  for (int i = 0; i < kVecWidth; ++i) x[i] = static_cast<float>(p[i]);
#endif
  return reinterpret_cast<const vfloat&>(x);
}
inline void vstore_float(half_t* p, vfloat x) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(reinterpret_cast<const __m512&>(x), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__) && defined(__AVX2__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(reinterpret_cast<const __m256&>(x), _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < kVecWidth; ++i) p[i] = static_cast<half_t>(x[i]);
#endif
}

template <class T>
inline void load_row(const T* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + kVecWidth <= n; i += kVecWidth) vstore(dst + i, vload_float(src + i));
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

template <class T>
inline void store_row(const float* __restrict src, T* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + kVecWidth <= n; i += kVecWidth) vstore_float(dst + i, vload(src + i));
  for (; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// x <- x * rsqrt(sum(x^2) + eps) * mul  (eps as in FLA / HF Qwen3-Next)
constexpr float kL2NormEps = 1e-6f;
inline void l2normalize(float* x, int64_t n, float mul) {
  const float r = mul / std::sqrt(dot(x, x, n) + kL2NormEps);
  for (int64_t i = 0; i < n; ++i) x[i] *= r;
}

inline float softplus(float x, float beta, float threshold) {
  const float bx = beta * x;
  return bx > threshold ? x : std::log1p(std::exp(bx)) / beta;
}

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// Calls f(tag) with a value of the C++ storage type matching `dt`.
template <class F>
inline void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(bf16_t{}); break;
    case DType::kFloat16: f(half_t{}); break;
  }
}

}  // namespace GDN_ISA
}  // namespace gdn
