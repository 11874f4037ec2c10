// The KDA gate, shared by the kda_gate op and the fused decode kernel (per token and head, over the
// K channels): g = -exp(A_log[h]) * softplus(f + dt_bias) (softplus beta 1, linear above 20), or
// with a lower bound lb: g = lb * sigmoid(exp(A_log[h]) * (f + dt_bias)); beta = sigmoid(b).
#pragma once
#include <algorithm>
#include <cmath>

#include "common/vec.h"

namespace gdn {
namespace GDN_ISA {

inline vfloat kda_gate_vec(const KdaGateParams& p, vfloat x, float A) {
  if (p.has_lower_bound) return p.lower_bound / (1.f + vexp(-A * x));
  return -A * vsoftplus(x, 1.f, 20.f);
}

// g[0, K) of token t, head h.
inline void kda_gate_row(const KdaGateParams& p, int64_t t, int64_t h, float* g) {
  const int64_t K = p.K;
  const float A = std::exp(p.A_log[h]);
  const float* bias = p.dt_bias ? p.dt_bias + h * K : nullptr;
  dispatch_dtype(p.f.dtype, [&](auto tag) { load_row(p.f.row<const decltype(tag)>(t, h), g, K); });
  int64_t d = 0;
  for (; d + kVecWidth <= K; d += kVecWidth) {
    const vfloat x = bias ? vload(g + d) + vload(bias + d) : vload(g + d);
    vstore(g + d, kda_gate_vec(p, x, A));
  }
  if (d < K) {
    alignas(64) float tail[kVecWidth] = {};
    for (int64_t i = d; i < K; ++i) tail[i - d] = g[i] + (bias ? bias[i] : 0.f);
    const vfloat r = kda_gate_vec(p, vload(tail), A);
    for (int64_t i = d; i < K; ++i) g[i] = r[i - d];
  }
}

// beta = sigmoid(b[t, h]).
inline float kda_beta(const KdaGateParams& p, int64_t t, int64_t h) {
  float b = 0.f;
  dispatch_dtype(p.b.dtype, [&](auto tag) {
    b = to_float(static_cast<const decltype(tag)*>(p.b.data)[t * p.b.row_stride + h]);
  });
  return 1.f / (1.f + std::exp(-b));
}

}  // namespace GDN_ISA
}  // namespace gdn
