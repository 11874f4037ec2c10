// chunk_gated_delta_rule's chunk-parallel schedule (as flash-linear-attention runs it on GPUs), for
// prompts with fewer (sequence, head) tasks than threads. Three kinds of work:
//   - preparation of one (chunk, key head): chunk_load_qk + chunk_prepare of its value heads, the
//     work that does not read the carried state, into one slot per (chunk, value head);
//   - the state pass of one chain (sequence, value head, state column block):
//     chunk_state_step_chain (v_new and the state update) chunk after chunk, on its own copy of u's
//     columns, so that it only reads the slot another thread wrote; it leaves the packed S (before
//     the update) and v_new in the slot. Columns of the state are independent, so a head's pass may
//     split over column blocks (multiples of 16 columns);
//   - the output of one (chunk, value head) once every block has passed the chunk: chunk_output
//     (o = exp(gc) q S + P v_new, ~38% of a fused step's multiply-adds) from what the steps kept,
//     off the chains (VLLM_GDN_CPU_PREFILL_OUTPUT_TASKS=0: inside the steps, chunk_state_step, as
//     before). One thread, CPU time, 4 heads T8192 bf16 (2-core development VM): a chain step 12.6
//     -> 7.6 us plus a 5.7 us output task, the call's total work ~2% more.
// One parallel region (one fork/join per call): each thread owns whole chains and runs their next
// steps as soon as the chunk is prepared; when none is ready it claims the next preparation task
// (chunk order, a shared counter), and it waits (spins) only when neither is possible. Slots live in
// a ring of chunks: the preparation of chunk c reuses chunk c - R's slots once every column block
// has passed it. While a block runs a step it requests the next chunk's slot, when prepared, into
// its core's L2 (16-core host, 16 threads: a step 8-14% shorter, 4 heads 1.06x, 8 heads 1.01x). The pass takes the fewest column blocks whose longest chain fits one thread's share
// of the call's work: each block re-reads the chunk's left operands and packs its own, so narrow
// blocks cost more than their share of the products (16-core AMX host, one sequence T = 8192, 16
// threads: a step of 128 / 64 / 32 / 16 columns took ~34 / 23 / 16 / 12 us).
// Measured there (bench prefill --phases) the regions form this replaced (the state pass of a
// window of chunks beside the preparation of the next, a fork/join per window) lost to its joins:
// 4 heads, 16 threads 2.46M -> 3.42M tokens/s; 8 heads 1.51M -> 1.81M; 1 head equal.
// With the output rows fused into the state pass (output tasks off) the pass holds ~3/4 of a
// chunk's multiply-adds (measured on one thread at K = V = 128: 42% (AMX) / 60% (AVX-512) of its
// time) and bounds the call at 4 heads on 16 threads; the output tasks take that share off the
// chains at the cost of keeping S and v_new (packed bf16: 48 KiB at K = V = 128) per slot.
//
// Scratch memory, per call, kept by the calling thread for its next call: the ring of slots,
// (2C V + 2C K + C^2 + K C) floats per (chunk, value head) (C = 64: 176 KiB at K = V = 128; on bf16
// GEMM paths vo is C V floats and the rest bf16: 88 KiB), with output tasks K V + C V more (96 KiB,
// bf16: 48 KiB), ~2 MiB per thread and at least 2 chunks,
// plus each chain's fp32 state block (about Hv K V floats per sequence). Per thread: the sequential
// schedule's scratch.
// Same operations on the same operands as the sequential schedule (chunk_math.h).
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "gdn/chunk_math.h"
#include "gdn/prefill_schedule.h"

namespace gdn {
namespace GDN_ISA {
namespace chunk {
namespace {

// The ring of slots: ~2 MiB per thread (about what an L2 cache holds).
constexpr size_t kRingBytesPerThread = size_t{2} << 20;
// Costs (to choose the column blocks) are multiply-adds, the preparation's weighted: with its vector
// work (gathers, exp, the inverse's dependency chain, bf16 rounding) it took 2x (fp32 products,
// AVX-512) and 4x (bf16 products, AMX) the time of its multiply-adds relative to the state pass
// (measured at K = V = 128, one thread: preparation 40% / 58% of the time on those paths).
constexpr int64_t kPrepareWeight[2] = {2, 4};
constexpr int64_t kColumnBlock = 16;  // state column blocks start at multiples of this

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// Per-phase timers (prefill_phases_enabled()): each thread adds to its own line, the calling
// thread sums them after the join.
using Clock = std::chrono::steady_clock;
inline double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }
struct alignas(64) ThreadTimes {
  double prepare = 0, pass = 0, wait = 0, start = 0, end = 0, output = 0;
  int64_t prepare_tasks = 0, pass_steps = 0, output_tasks = 0;
  bool used = false;
  Clock::time_point finished;
};
void report_phases(std::vector<ThreadTimes>& t, Clock::time_point call_start, int64_t regions) {
  double v[kPhaseCount] = {};
  v[kPhaseCalls] = 1;
  v[kPhaseWall] = seconds(call_start, Clock::now());
  v[kPhaseRegions] = static_cast<double>(regions);
  for (const ThreadTimes& x : t) {
    if (!x.used) continue;
    v[kPhasePrepare] += x.prepare, v[kPhasePass] += x.pass, v[kPhaseWait] += x.wait;
    v[kPhaseStart] += x.start, v[kPhaseEnd] += x.end;
    v[kPhaseBusiestPass] = std::max(v[kPhaseBusiestPass], x.pass);
    v[kPhasePrepareTasks] += static_cast<double>(x.prepare_tasks);
    v[kPhasePassSteps] += static_cast<double>(x.pass_steps);
    v[kPhaseOutput] += x.output;
    v[kPhaseOutputTasks] += static_cast<double>(x.output_tasks);
    v[kPhaseThreads] += 1;
  }
  add_prefill_phase_times(v);
}

inline void cpu_relax() {
#if defined(__x86_64__) && (defined(__AVX2__) || defined(__AVX512F__))
  _mm_pause();
#endif
}

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
// Padding: zero outputs. Empty sequences: a fresh state is zero (as the sequential walk leaves it).
template <class TIn, class TState>
void zero_padding_and_empty(const ChunkParams& p) {
  const int64_t K = p.K, V = p.V, Hv = p.Hv;
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

}

// The chunks of the sequences that have a state slot, in order.
std::vector<ChunkRef> list_chunks(const ChunkParams& p) {
  std::vector<ChunkRef> chunks;
  for (int64_t seq = 0; seq < p.N; ++seq) {
    if (p.state_indices[seq] < 0) continue;
    for (int64_t c0 = p.cu_seqlens[seq]; c0 < p.cu_seqlens[seq + 1]; c0 += kChunk)
      chunks.push_back({seq, c0, std::min(kChunk, p.cu_seqlens[seq + 1] - c0)});
  }
  return chunks;
}

struct Chain {
  int64_t seq, h, v0, vb, first, last, cost;
};

template <class TIn, class TState>
void chunk_parallel_kernel(const ChunkParams& p, bool bf16_gemm) {
  const int64_t K = p.K, V = p.V, Hv = p.Hv, Hk = p.Hk, ratio = Hv / Hk, C = kChunk;
  const int64_t threads = num_threads();
  const bool timed = prefill_phases_enabled();
  const Clock::time_point call_start = timed ? Clock::now() : Clock::time_point{};
  zero_padding_and_empty<TIn, TState>(p);
  const std::vector<ChunkRef> chunks = list_chunks(p);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  if (num_chunks == 0) return;

  const int64_t vo_f = round16((bf16_gemm ? 1 : 2) * C * V);
  const int64_t wq_f = bf16_gemm ? round16(C * even(K)) : round16(2 * C * K);
  const int64_t P_f = bf16_gemm ? C * C / 2 : C * C, kTd_f = bf16_gemm ? round16(K * C / 2) : round16(K * C);
  // Output tasks (prefill_output_tasks_enabled()): the operands each chain step keeps for them.
  const bool output_tasks = prefill_output_tasks_enabled();
  const int64_t keepS_f = !output_tasks ? 0 : bf16_gemm ? round16(even(K) / 2 * V) : round16(K * V);
  const int64_t keepV_f = !output_tasks ? 0 : bf16_gemm ? round16(C / 2 * V) : round16(C * V);
  const int64_t slot_floats = vo_f + wq_f + P_f + kTd_f + keepS_f + keepV_f;
  const int64_t ring = std::clamp<int64_t>(
      static_cast<int64_t>(kRingBytesPerThread * threads / sizeof(float)) / (Hv * slot_floats), 2, num_chunks);

  // Column blocks: the fewest whose longest chain fits one thread's share of the whole call.
  const int64_t per_column = 3 * K + C / 2;
  int64_t pass_cost = 0, prepare_cost = 0, longest = 0;
  for (const ChunkRef& c : chunks) {
    pass_cost += Hv * c.n * V * per_column;
    prepare_cost += Hk * kPrepareWeight[bf16_gemm] * c.n * (c.n * K + ratio * (c.n * (K + V) / 2 + c.n * c.n / 6));
  }
  for (int64_t seq = 0; seq < p.N; ++seq)
    if (p.state_indices[seq] >= 0) longest = std::max<int64_t>(longest, p.cu_seqlens[seq + 1] - p.cu_seqlens[seq]);
  const double share = static_cast<double>(pass_cost + prepare_cost) / threads;
  const int64_t chain_per_column = output_tasks ? 2 * K : per_column;  // the output's K + C/2 off the chain
  int64_t Vb = V, blocks = 1;
  for (;; ++blocks) {
    Vb = blocks == 1 ? V : ((V + blocks - 1) / blocks + kColumnBlock - 1) / kColumnBlock * kColumnBlock;
    if (Vb <= kColumnBlock || static_cast<double>(longest) * Vb * chain_per_column <= share) break;
  }
  blocks = (V + Vb - 1) / Vb;

  // Chains, dealt out to the threads largest first (LPT), each to the least-loaded thread.
  std::vector<Chain> chains;
  for (int64_t ci = 0; ci < num_chunks;) {
    const int64_t seq = chunks[ci].seq;
    int64_t last = ci;
    while (last + 1 < num_chunks && chunks[last + 1].seq == seq) ++last;
    const int64_t tokens = chunks[last].c0 + chunks[last].n - chunks[ci].c0;
    for (int64_t h = 0; h < Hv; ++h)
      for (int64_t v0 = 0; v0 < V; v0 += Vb) chains.push_back({seq, h, v0, std::min(Vb, V - v0), ci, last, tokens * std::min(Vb, V - v0)});
    ci = last + 1;
  }
  std::stable_sort(chains.begin(), chains.end(), [](const Chain& x, const Chain& y) { return x.cost > y.cost; });
  std::vector<std::vector<int64_t>> owned(threads);
  {
    std::vector<int64_t> load(threads, 0);
    for (int64_t j = 0; j < static_cast<int64_t>(chains.size()); ++j) {
      const int64_t i = std::min_element(load.begin(), load.end()) - load.begin();
      owned[i].push_back(j);
      load[i] += chains[j].cost;
    }
  }

  // Scratch: the ring of slots, then each chain's fp32 state block [K, vb] (row stride vb).
  const int64_t ring_floats = ring * Hv * slot_floats, S_stride = round16(K * Vb);
  float* scratch = call_scratch(ring_floats + static_cast<int64_t>(chains.size()) * S_stride);
  float* const chain_S = scratch + ring_floats;
  std::vector<float> e_last(ring * Hv);
  auto kept_of = [&](int64_t ci, int64_t h, int64_t v0) {
    float* base = scratch + ((ci % ring) * Hv + h) * slot_floats + vo_f + wq_f + P_f + kTd_f;
    return KeptOperands{base + (bf16_gemm ? even(K) / 2 : K) * v0, base + keepS_f + (bf16_gemm ? C / 2 : C) * v0};
  };
  auto slot_of = [&](int64_t ci, int64_t h) {
    const int64_t r = ci % ring;
    float* base = scratch + (r * Hv + h) * slot_floats;
    float *wq = base + vo_f, *P = wq + wq_f, *kTd = P + P_f;
    auto u16 = [](float* x) { return reinterpret_cast<uint16_t*>(x); };
    return ChunkSlot{base, wq, P, kTd, u16(wq), u16(P), u16(kTd), e_last[r * Hv + h]};
  };
  // prepared[ci * Hk + hk]: chunk ci's preparation for key head hk is done; passed[ci * Hv + h]:
  // how many column blocks of value head h have passed chunk ci; done[ci * Hv + h] (output tasks):
  // chunk ci's output rows of head h are written (its slot is then free).
  std::unique_ptr<std::atomic<int32_t>[]> prepared(new std::atomic<int32_t>[num_chunks * Hk]);
  std::unique_ptr<std::atomic<int32_t>[]> passed(new std::atomic<int32_t>[num_chunks * Hv]);
  for (int64_t i = 0; i < num_chunks * Hk; ++i) prepared[i].store(0, std::memory_order_relaxed);
  std::unique_ptr<std::atomic<int32_t>[]> done(new std::atomic<int32_t>[num_chunks * Hv]);
  for (int64_t i = 0; i < num_chunks * Hv; ++i) {
    passed[i].store(0, std::memory_order_relaxed);
    done[i].store(0, std::memory_order_relaxed);
  }
  std::atomic<int64_t> next_prepare{0}, next_output{0};
  const int64_t prepare_tasks = num_chunks * Hk, all_output_tasks = output_tasks ? num_chunks * Hv : 0;
  // A slot is free once its chunk's outputs are written (output tasks) or every block passed it.
  std::atomic<int32_t>* const freed = output_tasks ? done.get() : passed.get();
  const int32_t freed_at = output_tasks ? 1 : static_cast<int32_t>(blocks);
  const size_t scratch_floats = ChunkScratch().carve(nullptr, K, V, 1);
  std::vector<ThreadTimes> times(timed ? threads : 0);
  const Clock::time_point fork = timed ? Clock::now() : Clock::time_point{};

  parallel_for(threads, 1, [&](int64_t begin, int64_t end) {
    ChunkScratch s;
    s.carve(thread_scratch(scratch_floats), K, V, 1);
    const Mm mm(p.gemm, bf16_gemm, s.a_bf16);
    ThreadTimes* tt = timed ? &times[begin] : nullptr;
    Clock::time_point t0;
    if (tt) t0 = Clock::now(), tt->start = seconds(fork, t0), tt->used = true;
    auto lap = [&](double& into) {
      const Clock::time_point t1 = Clock::now();
      into += seconds(t0, t1);
      t0 = t1;
    };
    // This invocation's chains (several when the team is smaller than `threads`), each at its next chunk.
    std::vector<int64_t> mine, at;
    for (int64_t i = begin; i < end; ++i)
      for (int64_t j : owned[i]) mine.push_back(j), at.push_back(chains[j].first);
    int64_t chains_left = static_cast<int64_t>(mine.size());

    // Claims the next preparation task if its slots are free (chunk ci - ring passed by all blocks).
    auto claim = [&](int64_t& task) {
      task = next_prepare.load(std::memory_order_relaxed);
      while (task < prepare_tasks) {
        const int64_t ci = task / Hk, hk = task % Hk;
        if (ci >= ring) {
          for (int64_t h = hk * ratio; h < (hk + 1) * ratio; ++h)
            if (freed[(ci - ring) * Hv + h].load(std::memory_order_acquire) < freed_at) return false;
        }
        if (next_prepare.compare_exchange_weak(task, task + 1, std::memory_order_relaxed)) return true;
      }
      return false;
    };
    int64_t idle = 0;
    while (true) {
      bool progressed = false;
      for (int64_t m = 0; m < static_cast<int64_t>(mine.size()); ++m) {
        const Chain& ch = chains[mine[m]];
        // Steps of this chain while their chunks are prepared.
        while (at[m] <= ch.last && prepared[at[m] * Hk + ch.h / ratio].load(std::memory_order_acquire)) {
          const int64_t ci = at[m];
          const ChunkRef& c = chunks[ci];
          float* S = chain_S + mine[m] * S_stride;
          TState* state = static_cast<TState*>(p.state.data) + p.state_indices[ch.seq] * p.state.slot_stride +
                          ch.h * K * V + ch.v0;
          if (ci == ch.first) {
            if (p.has_initial_state == nullptr || p.has_initial_state[ch.seq]) {
              for (int64_t r = 0; r < K; ++r) load_row(state + r * V, S + r * ch.vb, ch.vb);
            } else {
              std::fill_n(S, K * ch.vb, 0.f);
            }
          }
          if (tt) lap(tt->wait);
          ChunkSlot next_slot;
          const bool next_ready = ci < ch.last &&
                                  prepared[(ci + 1) * Hk + ch.h / ratio].load(std::memory_order_acquire);
          if (next_ready) next_slot = slot_of(ci + 1, ch.h);
          if (output_tasks) {
            chunk_state_step_chain<TIn>(p, mm, slot_of(ci, ch.h), c.n, S, ch.vb, ch.v0, ch.vb, bf16_gemm, s.vo,
                                        kept_of(ci, ch.h, ch.v0), next_ready ? &next_slot : nullptr);
          } else {
            chunk_state_step<TIn>(p, mm, s, ch.h, c.c0, c.n, slot_of(ci, ch.h), S, ch.vb, ch.v0, ch.vb, bf16_gemm,
                                  s.vo, next_ready ? &next_slot : nullptr);
          }
          passed[ci * Hv + ch.h].fetch_add(1, std::memory_order_release);
          if (ci == ch.last) {
            for (int64_t r = 0; r < K; ++r) store_row(S + r * ch.vb, state + r * V, ch.vb);
            --chains_left;
          }
          if (tt) lap(tt->pass), tt->pass_steps += 1;
          at[m] = ci + 1;
          progressed = true;
        }
      }
      if (progressed) continue;  // the chains first: they are the critical path
      int64_t task;
      if (claim(task)) {
        const int64_t ci = task / Hk, hk = task % Hk;
        const ChunkRef& c = chunks[ci];
        if (tt) lap(tt->wait);
        chunk_load_qk<TIn>(p, mm, s, hk, c.c0, c.n);
        for (int64_t h = hk * ratio; h < (hk + 1) * ratio; ++h) {
          ChunkSlot d = slot_of(ci, h);
          if (bf16_gemm) d.wq = s.wq, d.P = s.P, d.kTd = s.kT_decayed;  // the slot keeps bf16 copies
          e_last[(ci % ring) * Hv + h] = chunk_prepare<TIn>(p, mm, s, h, c.c0, c.n, bf16_gemm, d);
        }
        prepared[task].store(1, std::memory_order_release);
        if (tt) lap(tt->prepare), tt->prepare_tasks += 1;
        idle = 0;
        continue;
      }
      // Claims the next output task (chunk order) once every column block has passed its chunk.
      int64_t out_task = next_output.load(std::memory_order_relaxed);
      if (out_task < all_output_tasks && passed[out_task].load(std::memory_order_acquire) == blocks &&
          next_output.compare_exchange_strong(out_task, out_task + 1, std::memory_order_relaxed)) {
        const int64_t ci = out_task / Hv, h = out_task % Hv;
        const ChunkRef& c = chunks[ci];
        if (tt) lap(tt->wait);
        const ChunkSlot d = slot_of(ci, h);
        for (int64_t v0 = 0; v0 < V; v0 += Vb)
          chunk_output<TIn>(p, mm, h, c.c0, c.n, d, v0, std::min(Vb, V - v0), bf16_gemm, kept_of(ci, h, v0), s.vo);
        done[out_task].store(1, std::memory_order_release);
        if (tt) lap(tt->output), tt->output_tasks += 1;
        idle = 0;
        continue;
      }
      if (chains_left == 0 && next_prepare.load(std::memory_order_relaxed) >= prepare_tasks &&
          next_output.load(std::memory_order_relaxed) >= all_output_tasks)
        break;
      // Nothing ready: wait (yielding after a while, for a machine with more threads than cores).
      if (++idle < 4096) {
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
    if (tt) lap(tt->wait), tt->finished = t0;
    streaming_stores_done();
    if (p.gemm.release) p.gemm.release();
  });
  if (timed) {
    const Clock::time_point join = Clock::now();
    for (ThreadTimes& x : times)
      if (x.used) x.end = seconds(x.finished, join);
    report_phases(times, call_start, 1);
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
