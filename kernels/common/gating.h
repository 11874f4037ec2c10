// The GDN gate, shared by the gating op and the fused decode kernel:
//   g = -exp(A_log) * softplus(a + dt_bias),  beta = sigmoid(b)  (x2 with negative eigenvalues)
#pragma once
#include <algorithm>

#include "common/vec.h"

namespace gdn {
namespace GDN_ISA {

// g and beta of value heads [h0, h1) of token t, vectorised across heads.
inline void gate_range(const GatingParams& p, int64_t t, int64_t h0, int64_t h1, float* g, float* beta) {
  constexpr int64_t kChunk = 64;  // heads per round, on the stack
  alignas(64) float a[kChunk], b[kChunk], g_buf[kChunk], beta_buf[kChunk];
  const float beta_scale = p.allow_neg_eigval ? 2.f : 1.f;
  for (int64_t c0 = h0; c0 < h1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, h1 - c0), padded = (n + kVecWidth - 1) / kVecWidth * kVecWidth;
    dispatch_dtype(p.a.dtype, [&](auto tag) {
      load_row(static_cast<const decltype(tag)*>(p.a.data) + t * p.a.row_stride + c0, a, n);
    });
    dispatch_dtype(p.b.dtype, [&](auto tag) {
      load_row(static_cast<const decltype(tag)*>(p.b.data) + t * p.b.row_stride + c0, b, n);
    });
    alignas(64) float A_log[kChunk], dt_bias[kChunk];
    std::copy(p.A_log + c0, p.A_log + c0 + n, A_log);
    std::copy(p.dt_bias + c0, p.dt_bias + c0 + n, dt_bias);
    std::fill(a + n, a + padded, 0.f);  // padding lanes compute harmless values, never stored
    std::fill(b + n, b + padded, 0.f);
    std::fill(A_log + n, A_log + padded, 0.f);
    std::fill(dt_bias + n, dt_bias + padded, 0.f);
    for (int64_t i = 0; i < padded; i += kVecWidth) {
      const vfloat sp = vsoftplus(vload(a + i) + vload(dt_bias + i), p.softplus_beta, p.softplus_threshold);
      vstore(g_buf + i, -vexp(vload(A_log + i)) * sp);
      vstore(beta_buf + i, beta_scale / (1.f + vexp(-vload(b + i))));
    }
    std::copy(g_buf, g_buf + n, g + (c0 - h0));
    std::copy(beta_buf, beta_buf + n, beta + (c0 - h0));
  }
}

}  // namespace GDN_ISA
}  // namespace gdn
