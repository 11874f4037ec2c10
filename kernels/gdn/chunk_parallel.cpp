// chunk_gated_delta_rule's chunk-parallel schedule (as flash-linear-attention runs it on GPUs), for
// prompts with fewer (sequence, head) tasks than threads. The chunks of all sequences (sequence
// after sequence) are taken in windows of a few chunks, each in two steps:
//   1. prepare, in parallel over (chunk, key head): chunk_load_qk + chunk_prepare of its value
//      heads, the work that does not read the carried state, into one slot per (chunk, value head);
//   2. state pass, in parallel over (sequence, value head, state column block), each in chunk
//      order: chunk_state_step (v_new, the output rows, the state update) on its own copy of u's
//      columns, so that it only reads the slot another thread wrote. Columns of the state are
//      independent, so a head's pass may split over column blocks (multiples of 16 columns).
// One parallel region runs the state pass of window w - 1 beside the preparation of window w (both
// need only earlier regions): threads the state pass leaves idle prepare the next window, and a
// call forks and joins (windows + 1) times. A region's tasks are dealt out by estimated cost, and
// its state pass takes the fewest column blocks whose largest task fits one thread's share: narrow
// blocks cost more than their share of the products (on 2 cores, one sequence, AMX: 2 blocks of 64
// columns 1.16x one thread, 1 block beside preparation 1.46x).
// The output rows are written in the state pass: fusing o = qg S + P v_new there saves storing one
// state per chunk and a third parallel step; the pass then holds ~3/4 of a chunk's multiply-adds
// but, measured on one thread at K = V = 128, only 42% (AMX) / 60% (AVX-512) of its time.
//
// Scratch memory, per call, kept by the calling thread for its next call: two windows of slots,
// (2C V + 2C K + C^2 + K C) floats per (chunk, value head) (C = 64: 176 KiB at K = V = 128; on bf16
// GEMM paths vo is C V floats and the rest bf16: 88 KiB), a window ~1 MiB per thread and at most
// 1/8 of the chunks (at least one chunk: Hv slots), plus two fp32 states per value head carried
// between windows (2 Hv K V floats): about 2 MiB per thread + 2 Hv (C + K) V floats. Per thread:
// the sequential schedule's scratch.
// Same operations on the same operands as the sequential schedule (chunk_math.h).
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

#include "gdn/chunk_math.h"

namespace gdn {
namespace GDN_ISA {
namespace chunk {
namespace {

// A window's slots: ~1 MiB per thread (two windows are live at once: about what the L2 caches hold),
// and at most 1/8 of the chunks, so that most of the state pass runs beside preparation.
constexpr size_t kWindowBytesPerThread = size_t{1} << 20;
constexpr int64_t kMinWindows = 8;
// Task costs are multiply-adds, the preparation's weighted: with its vector work (gathers, exp, the
// inverse's dependency chain, bf16 rounding) it took 2x (fp32 products, AVX-512) and 4x (bf16
// products, AMX) the time of its multiply-adds relative to the state pass (measured at K = V = 128,
// one thread: preparation 40% / 58% of the time on those paths).
constexpr int64_t kPrepareWeight[2] = {2, 4};
constexpr int64_t kColumnBlock = 16;  // state column blocks start at multiples of this

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// Per-call scratch of the calling thread (not thread_scratch: the calling thread also runs a share
// of the parallel loops, which use theirs), grown on demand and kept for the next call.
float* call_scratch(size_t num_floats) {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<float, Free> buffer;
  thread_local size_t capacity = 0;
  if (num_floats > capacity) {
    buffer.reset();
    float* p = static_cast<float*>(std::aligned_alloc(64, (num_floats * sizeof(float) + 63) / 64 * 64));
    if (p == nullptr) throw std::bad_alloc();
    buffer.reset(p);
    capacity = num_floats;
  }
  return buffer.get();
}

struct ChunkRef {
  int64_t seq, c0, n;
};
// Consecutive chunks [first, first + count) of a window that belong to one sequence; starts /
// ends: the sequence's first / last chunk is among them.
struct Segment {
  int64_t seq, first, count, tokens;
  bool starts, ends;
};

// One unit of a region's work: the state-independent work of one (chunk, key head), or the state
// pass of one (segment, value head, column block [v0, v0 + vb)); cost in multiply-adds.
struct Task {
  enum Kind { kPrepare, kStatePass } kind;
  int64_t a, b, v0, vb, cost;
};

// Deals the tasks out to `threads` lists, largest first, each to the least-loaded list (LPT).
void balance(std::vector<Task>& tasks, int64_t threads, std::vector<std::vector<Task>>& plan) {
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
  const int64_t lists = std::min<int64_t>(threads, static_cast<int64_t>(tasks.size()));
  plan.assign(lists, {});
  std::vector<int64_t> load(lists, 0);
  for (const Task& t : tasks) {
    const int64_t i = std::min_element(load.begin(), load.end()) - load.begin();
    plan[i].push_back(t);
    load[i] += t.cost;
  }
}

template <class TIn, class TState>
void chunk_parallel_kernel(const ChunkParams& p, bool bf16_gemm) {
  const int64_t K = p.K, V = p.V, Hv = p.Hv, Hk = p.Hk, ratio = Hv / Hk, C = kChunk;
  const int64_t threads = num_threads();

  // Padding: zero outputs. Empty sequences: a fresh state is zero (as the sequential walk leaves it).
  bool any_special = false;
  for (int64_t seq = 0; seq < p.N; ++seq) {
    const bool empty = p.cu_seqlens[seq + 1] == p.cu_seqlens[seq];
    const bool fresh = p.has_initial_state != nullptr && !p.has_initial_state[seq];
    any_special |= p.state_indices[seq] < 0 || (empty && fresh);
  }
  if (any_special) {
    parallel_for(p.N * Hv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t seq = task / Hv, h = task % Hv, slot = p.state_indices[seq];
        const int64_t bos = p.cu_seqlens[seq], eos = p.cu_seqlens[seq + 1];
        if (slot < 0) {
          for (int64_t t = bos; t < eos; ++t) std::fill_n(p.out.row<TIn>(t, h), V, from_float<TIn>(0.f));
        } else if (bos == eos && p.has_initial_state != nullptr && !p.has_initial_state[seq]) {
          TState* state = static_cast<TState*>(p.state.data) + slot * p.state.slot_stride + h * K * V;
          std::fill_n(state, K * V, from_float<TState>(0.f));
        }
      }
    });
  }

  std::vector<ChunkRef> chunks;
  for (int64_t seq = 0; seq < p.N; ++seq) {
    if (p.state_indices[seq] < 0) continue;
    for (int64_t c0 = p.cu_seqlens[seq]; c0 < p.cu_seqlens[seq + 1]; c0 += C)
      chunks.push_back({seq, c0, std::min(C, p.cu_seqlens[seq + 1] - c0)});
  }
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  if (num_chunks == 0) return;

  // A slot: vo, then wq, P, kTd in fp32 or (bf16 GEMM path) their bf16 copies (ChunkSlot). The state
  // pass keeps v_new and o in its own scratch; chunk_prepare needs vo's o rows only in fp32.
  const int64_t vo_f = round16((bf16_gemm ? 1 : 2) * C * V);
  const int64_t wq_f = bf16_gemm ? round16(C * even(K)) : round16(2 * C * K);
  const int64_t P_f = bf16_gemm ? C * C / 2 : C * C, kTd_f = bf16_gemm ? round16(K * C / 2) : round16(K * C);
  const int64_t slot_floats = vo_f + wq_f + P_f + kTd_f;
  const int64_t window = std::clamp<int64_t>(
      std::min(static_cast<int64_t>(kWindowBytesPerThread * threads / sizeof(float)) / (Hv * slot_floats),
               (num_chunks + kMinWindows - 1) / kMinWindows),
      1, num_chunks);
  const int64_t num_windows = (num_chunks + window - 1) / window;
  const int64_t window_floats = window * Hv * slot_floats, carry_floats = Hv * K * V;
  float* scratch = call_scratch(2 * window_floats + 2 * carry_floats);
  float* const carry[2] = {scratch + 2 * window_floats, scratch + 2 * window_floats + carry_floats};
  std::vector<float> e_last(2 * window * Hv);
  // Slot of chunk ci (index within window w) and value head h.
  auto slot_of = [&](int64_t w, int64_t ci, int64_t h) {
    float* base = scratch + (w % 2) * window_floats + (ci * Hv + h) * slot_floats;
    float *wq = base + vo_f, *P = wq + wq_f, *kTd = P + P_f;
    auto u16 = [](float* x) { return reinterpret_cast<uint16_t*>(x); };
    return ChunkSlot{base, wq, P, kTd, u16(wq), u16(P), u16(kTd), e_last[((w % 2) * window + ci) * Hv + h]};
  };
  const size_t scratch_floats = ChunkScratch().carve(nullptr, K, V, 1);

  std::vector<Segment> segments;
  std::vector<Task> tasks;
  std::vector<std::vector<Task>> plan;
  for (int64_t region = 0; region <= num_windows; ++region) {
    // This region: the state pass of window region - 1 and the state-independent work of window
    // region (both depend only on earlier regions). Costs in multiply-adds, see kPrepareWeight.
    tasks.clear();
    int64_t prepare_cost = 0;
    if (region < num_windows) {
      const int64_t w0 = region * window, wc = std::min(window, num_chunks - w0);
      for (int64_t ci = 0; ci < wc; ++ci) {
        const int64_t n = chunks[w0 + ci].n;
        for (int64_t hk = 0; hk < Hk; ++hk) {  // k k^T, q k^T; per value head Tm v, Tm kg, the inverse
          tasks.push_back({Task::kPrepare, ci, hk, 0, 0,
                           kPrepareWeight[bf16_gemm] * n * (n * K + ratio * (n * (K + V) / 2 + n * n / 6))});
          prepare_cost += tasks.back().cost;
        }
      }
    }
    int64_t Vb = V;
    if (region > 0) {
      const int64_t w0 = (region - 1) * window, wc = std::min(window, num_chunks - w0);
      segments.clear();
      for (int64_t ci = 0; ci < wc; ++ci) {
        const ChunkRef& c = chunks[w0 + ci];
        if (segments.empty() || segments.back().seq != c.seq)
          segments.push_back({c.seq, ci, 0, 0, c.c0 == p.cu_seqlens[c.seq], false});
        segments.back().count += 1;
        segments.back().tokens += c.n;
        segments.back().ends = c.c0 + c.n == p.cu_seqlens[c.seq + 1];
      }
      // products per token and state column: [w; qg] S, P v_new, k^T v_new
      const int64_t per_column = 3 * K + C / 2;
      int64_t pass_cost = 0, longest = 0;
      for (const Segment& sg : segments) pass_cost += Hv * sg.tokens * V * per_column, longest = std::max(longest, sg.tokens);
      // The fewest column blocks whose largest task fits one thread's share of the region: narrow
      // blocks cost more than their share of the products (each re-reads the chunk's left
      // operands and packs its own operands), and the preparation fills the other threads.
      const double share = static_cast<double>(pass_cost + prepare_cost) / threads;
      for (int64_t blocks = 1;; ++blocks) {
        Vb = blocks == 1 ? V : ((V + blocks - 1) / blocks + kColumnBlock - 1) / kColumnBlock * kColumnBlock;
        if (Vb <= kColumnBlock || static_cast<double>(longest) * Vb * per_column <= share) break;
      }
      for (int64_t sg = 0; sg < static_cast<int64_t>(segments.size()); ++sg)
        for (int64_t h = 0; h < Hv; ++h)
          for (int64_t v0 = 0; v0 < V; v0 += Vb) {
            const int64_t vb = std::min(Vb, V - v0);
            tasks.push_back({Task::kStatePass, sg, h, v0, vb, segments[sg].tokens * vb * per_column});
          }
    }
    balance(tasks, threads, plan);

    const int64_t pass_w = region - 1, prep_w = region;
    const float* carry_in = carry[(pass_w + 1) % 2];
    float* carry_out = carry[(pass_w + 2) % 2];
    parallel_for(static_cast<int64_t>(plan.size()), 1, [&](int64_t begin, int64_t end) {
      ChunkScratch s;
      s.carve(thread_scratch(scratch_floats), K, V, 1);
      const Mm mm(p.gemm, bf16_gemm, s.a_bf16);
      for (int64_t thread = begin; thread < end; ++thread) {
        for (const Task& t : plan[thread]) {
          if (t.kind == Task::kPrepare) {
            const int64_t ci = t.a, hk = t.b;
            const ChunkRef& c = chunks[prep_w * window + ci];
            chunk_load_qk<TIn>(p, mm, s, hk, c.c0, c.n);
            for (int64_t h = hk * ratio; h < (hk + 1) * ratio; ++h) {
              ChunkSlot d = slot_of(prep_w, ci, h);
              if (bf16_gemm) d.wq = s.wq, d.P = s.P, d.kTd = s.kT_decayed;  // the slot keeps bf16 copies
              e_last[((prep_w % 2) * window + ci) * Hv + h] = chunk_prepare<TIn>(p, mm, s, h, c.c0, c.n, bf16_gemm, d);
            }
            continue;
          }
          const Segment& seg = segments[t.a];
          const int64_t h = t.b, v0 = t.v0, vb = t.vb;
          float* S = s.S;  // [K, vb]
          TState* state = static_cast<TState*>(p.state.data) + p.state_indices[seg.seq] * p.state.slot_stride +
                          h * K * V + v0;
          const bool has_init = p.has_initial_state == nullptr || p.has_initial_state[seg.seq];
          if (!seg.starts) {
            for (int64_t r = 0; r < K; ++r) std::copy_n(carry_in + h * K * V + r * V + v0, vb, S + r * vb);
          } else if (has_init) {
            for (int64_t r = 0; r < K; ++r) load_row(state + r * V, S + r * vb, vb);
          } else {
            std::fill_n(S, K * vb, 0.f);
          }
          for (int64_t ci = seg.first; ci < seg.first + seg.count; ++ci) {
            const ChunkRef& c = chunks[pass_w * window + ci];
            chunk_state_step<TIn>(p, mm, s, h, c.c0, c.n, slot_of(pass_w, ci, h), S, vb, v0, vb, bf16_gemm, s.vo);
          }
          if (seg.ends) {
            for (int64_t r = 0; r < K; ++r) store_row(S + r * vb, state + r * V, vb);
          } else {
            for (int64_t r = 0; r < K; ++r) std::copy_n(S + r * vb, vb, carry_out + h * K * V + r * V + v0);
          }
        }
      }
      streaming_stores_done();
      if (p.gemm.release) p.gemm.release();
    });
  }
}

}  // namespace

void chunk_parallel(const ChunkParams& p, bool bf16_gemm) {
  dispatch_dtype(p.q.dtype, [&](auto in_tag) {
    dispatch_dtype(p.state.dtype, [&](auto state_tag) {
      chunk_parallel_kernel<decltype(in_tag), decltype(state_tag)>(p, bf16_gemm);
    });
  });
}

}  // namespace chunk
}  // namespace GDN_ISA
}  // namespace gdn
