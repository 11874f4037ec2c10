// stream_scale: x *= factor in place over fp32 memory. Not a GDN op: the benchmarks' measure of
// this machine's in-place read+write bandwidth (the traffic of a decode step over cold states),
// streamed the way the decode kernel streams (vector width, software prefetch into L2), so that
// "% of stream" compares the kernel with what this CPU can do rather than with a slower loop.
#include <algorithm>

#include "common/parallel.h"
#include "common/vec.h"

namespace gdn {
namespace GDN_ISA {

void stream_scale(float* x, int64_t n, float factor) {
  constexpr int64_t kBlock = 16384;            // floats per task (64 KiB)
  constexpr int64_t kPrefetchFloats = 8192 / 4;  // 8 KiB ahead, as the decode kernel
  const vfloat f = vbroadcast(factor);
  parallel_for((n + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    const int64_t i0 = begin * kBlock, i1 = std::min(n, end * kBlock);
    int64_t i = i0;
    for (; i + kVecWidth <= i1; i += kVecWidth) {
      if (i % 16 == 0) __builtin_prefetch(x + i + kPrefetchFloats, 1, 2);
      vstore(x + i, vload(x + i) * f);
    }
    for (; i < i1; ++i) x[i] *= factor;
  });
}

}  // namespace GDN_ISA
}  // namespace gdn
