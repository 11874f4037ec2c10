// gdn_gating: g and beta for every (token, value head) in one parallel pass.
#include "common/gating.h"
#include "common/parallel.h"

namespace gdn {
namespace GDN_ISA {

void gdn_gating(const GatingParams& p) {
  parallel_for(p.T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) gate_range(p, t, 0, p.Hv, p.g + t * p.Hv, p.beta + t * p.Hv);
  });
}

}  // namespace GDN_ISA
}  // namespace gdn
