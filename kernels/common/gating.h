// The GDN gate, shared by the gating op and the fused decode kernel:
//   g = -exp(A_log) * softplus(a + dt_bias),  beta = sigmoid(b)  (x2 with negative eigenvalues)
#pragma once
#include "common/vec.h"

namespace gdn {
namespace GDN_ISA {

inline float read_scalar(const Mat2& m, int64_t row, int64_t col) {
  float x = 0.f;
  dispatch_dtype(m.dtype, [&](auto tag) {
    using T = decltype(tag);
    x = to_float(static_cast<const T*>(m.data)[row * m.row_stride + col]);
  });
  return x;
}

inline void gate_values(const GatingParams& p, int64_t t, int64_t h, float* g, float* beta) {
  const float a = read_scalar(p.a, t, h);
  const float b = read_scalar(p.b, t, h);
  *g = -std::exp(p.A_log[h]) * softplus(a + p.dt_bias[h], p.softplus_beta, p.softplus_threshold);
  *beta = sigmoid(b) * (p.allow_neg_eigval ? 2.f : 1.f);
}

}  // namespace GDN_ISA
}  // namespace gdn
