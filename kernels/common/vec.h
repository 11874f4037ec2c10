// Vector and conversion helpers for the per-ISA kernels. Everything here lives in namespace
// gdn::GDN_ISA so that each ISA's copy of these inline functions stays distinct at link time.
// Vectors are GCC/Clang vector extensions: the same source becomes AVX-512, AVX2 or SSE/NEON code
// depending on the flags the including file is compiled with.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
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
// scaling by 2^n through the exponent bits; ~1 ulp). Above 88.3 the result is exp(88.3) (never
// inf); below -87.3 (where exp leaves the normal range) it is exactly 0, never a denormal; NaN in
// gives NaN out.
inline vfloat vexp(vfloat x) {
  typedef int32_t vint __attribute__((vector_size(kVecWidth * sizeof(int32_t))));
  const vfloat in = x;
  x = x > vbroadcast(88.3f) ? vbroadcast(88.3f) : x;  // comparisons with NaN are false: NaN stays
  x = x < vbroadcast(-87.3f) ? vbroadcast(-87.3f) : x;
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
  const vfloat e = reinterpret_cast<const vfloat&>(bits);
  return in < vbroadcast(-87.3f) ? vfloat{} : (in == in ? e : in);
}

// y[i] = exp(a * x[i] + b) for i < n (y may be x), every element through vexp.
inline void exp_affine(const float* x, int64_t n, float a, float b, float* y) {
  int64_t i = 0;
  for (; i + kVecWidth <= n; i += kVecWidth) vstore(y + i, vexp(vload(x + i) * a + b));
  if (i == n) return;
  float tail[kVecWidth] = {};
  std::memcpy(tail, x + i, (n - i) * sizeof(float));
  const vfloat r = vexp(vload(tail) * a + b);
  for (int64_t j = 0; j < n - i; ++j) y[i + j] = r[j];
}

inline vfloat vsilu(vfloat x) { return x / (1.f + vexp(-x)); }

// log(x) for normal x > 0 (Cephes' logf: mantissa in [sqrt(1/2), sqrt(2)), degree-8 polynomial;
// ~1 ulp).
inline vfloat vlog(vfloat x) {
  typedef int32_t vint __attribute__((vector_size(kVecWidth * sizeof(int32_t))));
  const vint bits = reinterpret_cast<const vint&>(x);
  vfloat e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vfloat);
  const vint mbits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  vfloat m = reinterpret_cast<const vfloat&>(mbits);
  const auto small = m < vbroadcast(0.707106781186547524f);
  e = small ? e - 1.f : e;
  m = (small ? m + m : m) - 1.f;
  const vfloat z = m * m;
  vfloat y = vbroadcast(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z + e * -2.12194440e-4f - 0.5f * z;
  return m + y + e * 0.693359375f;
}

// softplus(x) = log(1 + exp(beta x)) / beta, or x where beta x > threshold (as torch). Written as
// max(bx, 0) + log1p(exp(-|bx|)) so nothing overflows; log1p(z) = log(u) z / (u - 1), u = 1 + z
// (Goldberg), is accurate for small z.
inline vfloat vsoftplus(vfloat x, float beta, float threshold) {
  const vfloat bx = beta * x;
  const vfloat z = vexp(bx < 0.f ? bx : -bx);
  const vfloat u = 1.f + z, d = u - 1.f;
  const vfloat log1p_z = d == 0.f ? z : vlog(u) * (z / (d == 0.f ? vbroadcast(1.f) : d));
  const vfloat sp = ((bx > 0.f ? bx : vfloat{}) + log1p_z) * (1.f / beta);
  return bx > threshold ? x : sp;
}

// Storage types. bf16 is handled as raw bits (portable, vectorises as shifts); fp16 uses the
// compiler's _Float16 (F16C/AVX512-FP16 instructions where the ISA has them).
struct bf16_t {
  uint16_t bits;
};
#if defined(__aarch64__)
// AArch64: __fp16 is the same IEEE half (fcvt conversions; GCC before 13 has no _Float16 in C++).
using half_t = __fp16;
#else
using half_t = _Float16;
#endif

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

#if defined(__AVX512F__)
// bf16 rows 32 columns at a time, as two fp32 vectors of the even and the odd columns: one load, a
// shift and a mask, where widening takes two loads and four instructions; the way back rounds both
// halves at once (vcvtne2ps2bf16 and a vpermw that interleaves them, or integer rounding without
// AVX512-BF16) and stores them with one instruction. Kernels that keep a tile in this column order
// permute the few vectors that meet other data (v, o) with the helpers below. The same store packs
// two fp32 rows into the bf16 pairs (VNNI layout) of a GEMM operand.
// The decode kernel walks bf16 states this way only without AVX512-BF16 (measured on this
// Xeon: 12% faster than widening there; with it, widening and vcvtneps2bf16 per vector stream
// cold states as fast, and the pairs only win while the states are in cache).
#if defined(__AVX512BF16__)
constexpr bool kHasBf16Pairs = false;
#else
constexpr bool kHasBf16Pairs = true;
#endif
inline void vload_bf16_pair(const bf16_t* p, vfloat& even, vfloat& odd) {
  const __m512i x = _mm512_loadu_si512(p);
  const __m512i e = _mm512_slli_epi32(x, 16), o = _mm512_and_si512(x, _mm512_set1_epi32(int(0xffff0000u)));
  even = reinterpret_cast<const vfloat&>(e);
  odd = reinterpret_cast<const vfloat&>(o);
}
inline void vstore_bf16_pair(bf16_t* p, vfloat even, vfloat odd) {
#if defined(__AVX512BF16__)
  // Words 0..15 = even, 16..31 = odd; vpermw interleaves them into column order.
  const __m512bh rounded =
      _mm512_cvtne2ps_pbh(reinterpret_cast<const __m512&>(odd), reinterpret_cast<const __m512&>(even));
  const __m512i halves = reinterpret_cast<const __m512i&>(rounded);
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  _mm512_storeu_si512(p, _mm512_permutexvar_epi16(interleave, halves));
  return;
#endif
  const vuint both = bf16_bits(even) | (bf16_bits(odd) << 16);  // lane i: columns 2i, 2i + 1
  _mm512_storeu_si512(p, reinterpret_cast<const __m512i&>(both));
}
// 32 fp32 values in column order (lo: 0..15, hi: 16..31) <-> even and odd columns.
inline void to_even_odd(vfloat lo, vfloat hi, vfloat& even, vfloat& odd) {
  const __m512i e = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i o = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512 l = reinterpret_cast<const __m512&>(lo), h = reinterpret_cast<const __m512&>(hi);
  const __m512 ev = _mm512_permutex2var_ps(l, e, h), od = _mm512_permutex2var_ps(l, o, h);
  even = reinterpret_cast<const vfloat&>(ev);
  odd = reinterpret_cast<const vfloat&>(od);
}
inline void from_even_odd(vfloat even, vfloat odd, vfloat& lo, vfloat& hi) {
  const __m512i l = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i h = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const __m512 e = reinterpret_cast<const __m512&>(even), o = reinterpret_cast<const __m512&>(odd);
  const __m512 lv = _mm512_permutex2var_ps(e, l, o), hv = _mm512_permutex2var_ps(e, h, o);
  lo = reinterpret_cast<const vfloat&>(lv);
  hi = reinterpret_cast<const vfloat&>(hv);
}
#elif defined(__AVX2__)
// The same pair layout on AVX2, 16 columns per 256-bit vector pair: one load, a shift and a mask
// per 16 columns where widening takes two vpmovzxwd and two shifts. The way back rounds both halves
// in 16-bit words (hi: the truncated bf16 values, lo: the 16 bits dropped), 10 integer operations
// per 16 columns where rounding, the NaN test and vpackusdw + vextracti128 took ~30; NaN stays NaN
// except a signalling NaN whose payload lies in the low 16 bits alone (no arithmetic result is one:
// x86 arithmetic returns quiet NaNs), which becomes infinity.
constexpr bool kHasBf16Pairs = true;
inline void vload_bf16_pair(const bf16_t* p, vfloat& even, vfloat& odd) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i e = _mm256_slli_epi32(x, 16), o = _mm256_and_si256(x, _mm256_set1_epi32(int(0xffff0000u)));
  even = reinterpret_cast<const vfloat&>(e);
  odd = reinterpret_cast<const vfloat&>(o);
}
inline void vstore_bf16_pair(bf16_t* p, vfloat even, vfloat odd) {
  const __m256i e = reinterpret_cast<const __m256i&>(even), o = reinterpret_cast<const __m256i&>(odd);
  const __m256i hi = _mm256_blend_epi16(_mm256_srli_epi32(e, 16), o, 0xaa);  // lane i: columns 2i, 2i + 1
  const __m256i lo = _mm256_blend_epi16(e, _mm256_slli_epi32(o, 16), 0xaa);
  // Round to nearest even: up where lo + (hi & 1) > 0x8000 (saturating: lo <= 0xffff).
  const __m256i s = _mm256_adds_epu16(lo, _mm256_and_si256(hi, _mm256_set1_epi16(1)));
  const __m256i up = _mm256_cmpeq_epi16(_mm256_max_epu16(s, _mm256_set1_epi16(int16_t(0x8001))), s);  // -1 or 0
  // hi + 1 where up, except the NaNs 0x7fff (signed saturation keeps it) and 0xffff (which wraps to 0;
  // the unsigned max restores it).
  const __m256i r = _mm256_max_epu16(_mm256_subs_epi16(hi, up), hi);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
}
// 16 fp32 values in column order (lo: 0..7, hi: 8..15) <-> even and odd columns.
inline void to_even_odd(vfloat lo, vfloat hi, vfloat& even, vfloat& odd) {
  const __m256 l = reinterpret_cast<const __m256&>(lo), h = reinterpret_cast<const __m256&>(hi);
  // Within 128-bit lanes first ([l0 l2 h0 h2 | l4 l6 h4 h6]), then 64-bit pairs across lanes.
  const __m256d e = _mm256_castps_pd(_mm256_shuffle_ps(l, h, _MM_SHUFFLE(2, 0, 2, 0)));
  const __m256d o = _mm256_castps_pd(_mm256_shuffle_ps(l, h, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m256 ev = _mm256_castpd_ps(_mm256_permute4x64_pd(e, _MM_SHUFFLE(3, 1, 2, 0)));
  const __m256 od = _mm256_castpd_ps(_mm256_permute4x64_pd(o, _MM_SHUFFLE(3, 1, 2, 0)));
  even = reinterpret_cast<const vfloat&>(ev);
  odd = reinterpret_cast<const vfloat&>(od);
}
inline void from_even_odd(vfloat even, vfloat odd, vfloat& lo, vfloat& hi) {
  const __m256 e = reinterpret_cast<const __m256&>(even), o = reinterpret_cast<const __m256&>(odd);
  const __m256 a = _mm256_unpacklo_ps(e, o), b = _mm256_unpackhi_ps(e, o);  // [0..3 | 8..11], [4..7 | 12..15]
  const __m256 lv = _mm256_permute2f128_ps(a, b, 0x20), hv = _mm256_permute2f128_ps(a, b, 0x31);
  lo = reinterpret_cast<const vfloat&>(lv);
  hi = reinterpret_cast<const vfloat&>(hv);
}
#else
constexpr bool kHasBf16Pairs = false;
#endif  // __AVX512F__

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

// store_row for rows written once and read much later (a prefill's output): whole 64-byte lines go
// out with non-temporal stores, which skip each line's read-for-ownership miss. Falls back to
// store_row unless dst is 64-byte aligned and n fills whole lines. Call streaming_stores_done()
// before the results are handed to another thread.
template <class T>
inline void store_row_streaming(const float* __restrict src, T* __restrict dst, int64_t n) {
#if defined(__AVX512F__)
  constexpr int64_t kPerLine = 64 / sizeof(T);
  if (reinterpret_cast<uintptr_t>(dst) % 64 == 0 && n % kPerLine == 0) {
    alignas(64) T line[kPerLine];
    for (int64_t i = 0; i < n; i += kPerLine) {
      store_row(src + i, line, kPerLine);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_load_si512(line));
    }
    return;
  }
#elif defined(__AVX2__) && defined(__F16C__)
  // 32 bytes at a time, converted in registers (no line buffer: reading back four 16-byte stores
  // as one load would stall on store forwarding).
  if (reinterpret_cast<uintptr_t>(dst) % 64 == 0 && n % (64 / sizeof(T)) == 0) {
    for (int64_t i = 0; i < n; i += 32 / sizeof(T)) {
      __m256i x;
      if constexpr (std::is_same_v<T, float>) {
        x = _mm256_castps_si256(_mm256_loadu_ps(src + i));
      } else if constexpr (std::is_same_v<T, bf16_t>) {
        const vuint a = bf16_bits(vload(src + i)), b = bf16_bits(vload(src + i + 8));
        x = _mm256_permute4x64_epi64(_mm256_packus_epi32(reinterpret_cast<const __m256i&>(a),
                                                         reinterpret_cast<const __m256i&>(b)), 0xd8);
      } else {
        x = _mm256_set_m128i(_mm256_cvtps_ph(_mm256_loadu_ps(src + i + 8), _MM_FROUND_TO_NEAREST_INT),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
      }
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), x);
    }
    return;
  }
#endif
  store_row(src, dst, n);
}
inline void streaming_stores_done() {
#if defined(__AVX512F__) || defined(__AVX2__)
  _mm_sfence();  // non-temporal stores are weakly ordered
#endif
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

// Requests `rows` rows of `bytes_per_row` bytes, `lds` elements apart, into the cache level that
// Locality names (__builtin_prefetch's: 3 = L1, 2 = L2). Prefetches never fault, so rows past the
// end of a buffer cost only the request.
template <int Locality, class T>
inline void prefetch_rows(const T* src, int64_t lds, int64_t rows, int64_t bytes_per_row) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < bytes_per_row; b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(src + r * lds) + b, 0, Locality);
}

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
