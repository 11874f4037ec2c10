// Thread-level helpers the per-ISA kernels call without including ATen: the implementations live
// in runtime.cpp (compiled for the baseline ISA) and run on at::parallel_for, so vLLM's and torch's
// thread settings and core binding apply to our kernels too.
#pragma once
#include <cstddef>
#include <cstdint>

namespace gdn {

using RangeFn = void (*)(const void* ctx, int64_t begin, int64_t end);
void parallel_for_impl(int64_t n, int64_t grain, const void* ctx, RangeFn fn);
int num_threads();

// Per-thread scratch memory (64-byte aligned, grown on demand, reused across calls so the hot path
// does not allocate). Valid until the next call on the same thread.
float* thread_scratch(size_t num_floats);

// Runs f(begin, end) over [0, n) in parallel chunks of at least `grain` items.
template <class F>
inline void parallel_for(int64_t n, int64_t grain, const F& f) {
  parallel_for_impl(n, grain, &f, [](const void* ctx, int64_t b, int64_t e) {
    (*static_cast<const F*>(ctx))(b, e);
  });
}

}  // namespace gdn
