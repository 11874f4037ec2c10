// Shared by the Mamba-1 selective-scan kernels: step sizes, the output gate, row loaders.
#pragma once
#include <algorithm>
#include <cstring>

#include "common/vec.h"

namespace gdn {
namespace GDN_ISA {
namespace mamba1 {

inline int64_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// Row t of a [T, cols] matrix, as T (const-qualify T to read); any_row when the dtype is known only
// at run time.
template <class T>
inline T* row(const Mat2& m, int64_t t) {
  return static_cast<T*>(m.data) + t * m.row_stride;
}
inline const void* any_row(const Mat2& m, int64_t t) {
  return static_cast<const char*>(m.data) + t * m.row_stride * dtype_size(m.dtype);
}

// Up to kVecWidth values of a row (n <= kVecWidth) as a vector, the missing lanes zero.
template <class T>
inline vfloat load_part(const T* src, int64_t n) {
  if (n == kVecWidth) return vload_float(src);
  alignas(64) float t[kVecWidth] = {};
  for (int64_t i = 0; i < n; ++i) t[i] = to_float(src[i]);
  return vload(t);
}
template <class T>
inline void store_part(T* dst, vfloat v, int64_t n) {
  if (n == kVecWidth) return vstore_float(dst, v);
  alignas(64) float t[kVecWidth];
  vstore(t, v);
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(t[i]);
}

// 2^t for the decays exp(dt A) = 2^(dt log2(e) A) (t <= 0 expected; any t is safe): the kernels
// fold log2(e) into dt, one rounding like the product dt A itself (whose rounding already costs a
// relative error of |dt A| 2^-24 in any exp of it, so vexp's two-part reduction buys nothing here).
// With AVX-512: n = round(t), f = t - n (exact), a degree-6 relative-minimax polynomial for 2^f on
// [-1/2, 1/2] (1.9e-9 in exact arithmetic, 9.8e-8 measured in fp32 over [-125, 0]) and vscalefps
// for the 2^n: 10 vector ops where vexp takes 19, no clamps; below -126 exactly 0 (as vexp below
// its range), NaN stays NaN. Elsewhere vexp(t ln 2).
constexpr float kLog2e = 1.44269504088896341f;
#if defined(__AVX512F__)
inline vfloat vexp2_decay(vfloat t) {
  const __m512 v = reinterpret_cast<const __m512&>(t);
  // "not less than", unordered true: NaN lanes are kept (and stay NaN), not zeroed.
  const __mmask16 keep = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(v, n);
  __m512 p = _mm512_set1_ps(0.0001534581242594868f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0013399930903688073f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.009618489071726799f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550328642129898f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022646248340607f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471824645996f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __m512 e = _mm512_maskz_scalef_ps(keep, p, n);
  return reinterpret_cast<const vfloat&>(e);
}
#else
inline vfloat vexp2_decay(vfloat t) { return vexp(t * 0.693147180559945309f); }
#endif

// Step sizes of channels [d0, d0 + n) (n <= kVecWidth) of one raw dt row: softplus(dt + bias)
// (threshold 20, linear above) or dt + bias; missing lanes zero.
inline vfloat step_sizes(const Mamba1Params& p, const void* dt_row, int64_t d0, int64_t n) {
  vfloat d{};
  dispatch_dtype(p.dt.dtype, [&](auto tag) { d = load_part(static_cast<const decltype(tag)*>(dt_row) + d0, n); });
  if (p.dt_bias) d += load_part(p.dt_bias + d0, n);
  if (p.dt_softplus) d = vsoftplus(d, 1.f, 20.f);
  if (n < kVecWidth) {  // softplus(0) = log 2 in the missing lanes: keep them zero
    alignas(64) float t[kVecWidth];
    vstore(t, d);
    std::fill(t + n, t + kVecWidth, 0.f);
    d = vload(t);
  }
  return d;
}

// silu(z) = z / (1 + exp(-z)); with AVX-512 the division as a 14-bit reciprocal and one Newton
// step (~1e-7 relative; vdivps alone cost ~15% of a gated prefill).
inline vfloat silu(vfloat z) {
#if defined(__AVX512F__)
  const vfloat d = 1.f + vexp(-z);
  const __m512 r0 = _mm512_rcp14_ps(reinterpret_cast<const __m512&>(d));
  const vfloat r = reinterpret_cast<const vfloat&>(r0);
  return z * (r * (2.f - d * r));
#else
  return vsilu(z);
#endif
}

// (y + D x) * silu(z) on one vector of channels [d0, d0 + n); x as fp32, z row in TIn (or null).
template <class TIn>
inline vfloat finish(vfloat y, vfloat x, const Mamba1Params& p, const TIn* z_row, int64_t d0, int64_t n) {
  if (p.D) y += load_part(p.D + d0, n) * x;
  if (z_row) y *= silu(load_part(z_row + d0, n));
  return y;
}

// A row of n values of a dtype known at run time -> fp32.
inline void load_any(const void* src, DType dtype, float* dst, int64_t n) {
  dispatch_dtype(dtype, [&](auto tag) { load_row(static_cast<const decltype(tag)*>(src), dst, n); });
}

}  // namespace mamba1
}  // namespace GDN_ISA
}  // namespace gdn
