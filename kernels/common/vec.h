// Vector and conversion helpers for the per-ISA kernels. Everything here lives in namespace
// gdn::GDN_ISA so that each ISA's copy of these inline functions stays distinct at link time.
// Vectors are GCC/Clang vector extensions: the same source becomes AVX-512, AVX2 or SSE/NEON code
// depending on the flags the including file is compiled with.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

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
inline vfloat vbroadcast(float x) { return vfloat{} + x; }

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

template <class T>
inline void load_row(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <class T>
inline void store_row(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
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
