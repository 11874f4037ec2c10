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

// (y + D x) * silu(z) on one vector of channels [d0, d0 + n); x as fp32, z row in TIn (or null).
template <class TIn>
inline vfloat finish(vfloat y, vfloat x, const Mamba1Params& p, const TIn* z_row, int64_t d0, int64_t n) {
  if (p.D) y += load_part(p.D + d0, n) * x;
  if (z_row) y *= vsilu(load_part(z_row + d0, n));
  return y;
}

// A row of n values of a dtype known at run time -> fp32.
inline void load_any(const void* src, DType dtype, float* dst, int64_t n) {
  dispatch_dtype(dtype, [&](auto tag) { load_row(static_cast<const decltype(tag)*>(src), dst, n); });
}

}  // namespace mamba1
}  // namespace GDN_ISA
}  // namespace gdn
