// gated_rms_norm: vLLM's RMSNormGated with norm_before_gate and one group (the GDN layers' output
// norm), fused in one pass per row: out = x * rsqrt(mean(x^2) + eps) * weight * act(z), act = silu or
// sigmoid, all in fp32, rounded once to the output dtype. Rows in parallel; the two reads of a row
// (sum of squares, then the product) hit L1.
#include <algorithm>
#include <cmath>

#include "common/parallel.h"
#include "common/vec.h"

namespace gdn {
namespace GDN_ISA {
namespace {

template <class T>
void norm_kernel(const GatedRmsNormParams& p) {
  const int64_t D = p.D;
  const float* w = p.weight;
  // ~16 KiB of x and z per task at least.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1));
  parallel_for(p.rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* x = p.x.row<const T>(r);
      const T* z = p.z.row<const T>(r);
      T* out = p.out.row<T>(r);
      vfloat sv = vfloat{};
      int64_t i = 0;
      for (; i + kVecWidth <= D; i += kVecWidth) {
        const vfloat xv = vload_float(x + i);
        sv += xv * xv;
      }
      float ss = 0.f;
      for (int j = 0; j < kVecWidth; ++j) ss += sv[j];
      for (; i < D; ++i) ss += to_float(x[i]) * to_float(x[i]);
      const float scale = 1.f / std::sqrt(ss / static_cast<float>(D) + p.eps);
      i = 0;
      for (; i + kVecWidth <= D; i += kVecWidth) {
        const vfloat zv = vload_float(z + i);
        const vfloat gate = p.sigmoid ? 1.f / (1.f + vexp(-zv)) : vsilu(zv);
        vstore_float(out + i, vload_float(x + i) * scale * vload(w + i) * gate);
      }
      for (; i < D; ++i) {
        const float zf = to_float(z[i]);
        const float sig = 1.f / (1.f + std::exp(-zf));
        const float gate = p.sigmoid ? sig : zf * sig;
        out[i] = from_float<T>(to_float(x[i]) * scale * w[i] * gate);
      }
    }
  });
}

}  // namespace

void gated_rms_norm(const GatedRmsNormParams& p) {
  if (p.rows == 0 || p.D == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) { norm_kernel<decltype(tag)>(p); });
}

}  // namespace GDN_ISA
}  // namespace gdn
