// chunk_gated_delta_rule: prefill with the chunked (WY / UT-transform) form of the gated delta
// rule (the math: chunk_math.h). Two schedules, chosen per call (prefill_schedule.h; forced with
// VLLM_GDN_CPU_PREFILL_SCHEDULE):
//  - sequential (this file): one task = one (sequence, value head), or a group of the value heads
//    of one key head; it walks its chunks in order, carrying the fp32 state. Best when there are
//    enough such tasks to keep every thread equally busy.
//  - chunk_parallel (chunk_parallel.cpp): the state-independent work of every chunk in parallel,
//    then only the state pass in order, split over (sequence, head, state column block). For one
//    long prompt with few heads.
#include "gdn/chunk_math.h"
#include "gdn/prefill_schedule.h"

namespace gdn {
namespace GDN_ISA {
namespace {

using namespace chunk;

template <class TIn, class TState>
void sequential_kernel(const ChunkParams& p, bool bf16_gemm, int64_t G) {
  const int64_t K = p.K, V = p.V, ratio = p.Hv / p.Hk, C = kChunk;
  const int64_t groups = p.Hv / G;
  const size_t scratch_floats = ChunkScratch().carve(nullptr, K, V, G);

  parallel_for(p.N * groups, 1, [&](int64_t begin, int64_t end) {
    ChunkScratch s;
    s.carve(thread_scratch(scratch_floats), K, V, G);
    const Mm mm(p.gemm, bf16_gemm, s.a_bf16);
    const ChunkSlot d{s.vo, s.wq, s.P, s.kT_decayed, s.wq_bf16, s.P_bf16, s.kTd_bf16, 0.f};
    for (int64_t task = begin; task < end; ++task) {
      // Head-major order: at::parallel_for splits the range statically, and every head of a
      // sequence costs the same, so each thread gets an equal share of every sequence's work.
      const int64_t h0 = task / p.N * G, seq = task % p.N, hk = h0 / ratio;
      const int64_t bos = p.cu_seqlens[seq], eos = p.cu_seqlens[seq + 1];
      const int64_t slot = p.state_indices[seq];

      if (slot < 0) {  // padding: zero output, touch no state
        for (int64_t h = h0; h < h0 + G; ++h)
          for (int64_t t = bos; t < eos; ++t) std::fill_n(p.out.row<TIn>(t, h), V, from_float<TIn>(0.f));
        continue;
      }
      TState* state = static_cast<TState*>(p.state.data) + slot * p.state.slot_stride + h0 * K * V;
      const bool has_init = p.has_initial_state == nullptr || p.has_initial_state[seq];
      if (has_init) {
        load_row(state, s.S, G * K * V);
      } else {
        std::fill(s.S, s.S + G * K * V, 0.f);
      }

      for (int64_t c0 = bos; c0 < eos; c0 += C) {
        const int64_t n = std::min(C, eos - c0);
        chunk_load_qk<TIn>(p, mm, s, hk, c0, n);
        for (int64_t r = 0; r < G; ++r) {
          ChunkSlot dr = d;
          dr.e_last = chunk_prepare<TIn>(p, mm, s, h0 + r, c0, n, bf16_gemm, d);
          chunk_state_step<TIn>(p, mm, s, h0 + r, c0, n, dr, s.S + r * K * V, V, 0, V, bf16_gemm);
        }
      }
      store_row(s.S, state, G * K * V);
    }
    streaming_stores_done();
    if (p.gemm.release) p.gemm.release();
  });
}

}  // namespace

void chunk_gated_delta_rule(const ChunkParams& p) {
  const bool bf16_gemm = has_bf16_gemm(p.gemm) && p.q.dtype == DType::kBFloat16;
  // The value heads of one key head share q, k, q k^T and k k^T: one sequential task takes them all
  // (a group), unless that would leave threads idle or unevenly loaded.
  const int64_t ratio = p.Hv / p.Hk, grouped_tasks = p.N * p.Hk, threads = num_threads();
  const int64_t G = grouped_tasks % threads == 0 || grouped_tasks >= 4 * threads ? ratio : 1;
  const PrefillSchedule schedule = choose_prefill_schedule(p, G, threads);
  if (schedule == PrefillSchedule::kChunkParallel) return chunk::chunk_parallel(p, bf16_gemm);
  dispatch_dtype(p.q.dtype, [&](auto in_tag) {
    dispatch_dtype(p.state.dtype, [&](auto state_tag) {
      sequential_kernel<decltype(in_tag), decltype(state_tag)>(p, bf16_gemm, G);
    });
  });
}

}  // namespace GDN_ISA
}  // namespace gdn
