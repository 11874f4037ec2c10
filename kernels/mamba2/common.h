// Shared by the Mamba2 (SSD) kernels: the step size of one (token, head) and row helpers.
#pragma once
#include <algorithm>
#include <cmath>

#include "common/vec.h"

namespace gdn {
namespace GDN_ISA {
namespace mamba2 {

// dt = clamp(softplus(dt_raw + dt_bias), lo, hi) (softplus with threshold 20, linear above, as
// torch's F.softplus).
inline float step_size(const Mamba2Params& p, float raw, int64_t h) {
  float d = raw + (p.dt_bias ? p.dt_bias[h] : 0.f);
  if (p.dt_softplus) d = d > 20.f ? d : std::log1p(std::exp(d));
  return std::min(std::max(d, p.dt_min), p.dt_max);
}

// Raw dt of token t, head h, as fp32.
inline float raw_dt(const Mamba2Params& p, int64_t t, int64_t h) {
  float r = 0.f;
  dispatch_dtype(p.dt.dtype, [&](auto tag) {
    r = to_float(static_cast<const decltype(tag)*>(p.dt.data)[t * p.dt.row_stride + h]);
  });
  return r;
}

// y[0, n) = (y + D x) * silu(z) (D, z optional), in place on fp32 y; x and z rows in TIn.
template <class TIn>
inline void finish_row(float* y, const TIn* x, const TIn* z, float D, bool has_D, int64_t n) {
  int64_t i = 0;
  for (; i + kVecWidth <= n; i += kVecWidth) {
    vfloat v = vload(y + i);
    if (has_D) v += D * vload_float(x + i);
    if (z) {
      const vfloat zz = vload_float(z + i);
      v *= vsilu(zz);
    }
    vstore(y + i, v);
  }
  for (; i < n; ++i) {
    float v = y[i];
    if (has_D) v += D * to_float(x[i]);
    if (z) {
      const float zz = to_float(z[i]);
      v *= zz / (1.f + std::exp(-zz));
    }
    y[i] = v;
  }
}

}  // namespace mamba2
}  // namespace GDN_ISA
}  // namespace gdn
