// kda_gate: the per-channel log-decay g [T, H, K] and beta [T, H] of every (token, head).
#include "common/parallel.h"
#include "kda/gate.h"

namespace gdn {
namespace GDN_ISA {

void kda_gate(const KdaGateParams& p) {
  parallel_for(p.T * p.H, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / p.H, h = r % p.H;
      kda_gate_row(p, t, h, p.g + r * p.K);
      p.beta[r] = kda_beta(p, t, h);
    }
  });
}

}  // namespace GDN_ISA
}  // namespace gdn
