// fused_recurrent_gated_delta_rule: decode. Memory-bound: every token of every sequence reads and
// writes its whole [K, V] state, so the kernel is built to touch DRAM once per state byte.
//
// Each task owns one (sequence, value head, V-block). Columns of the state are independent in every
// step (S^T k, S^T q and the rank-1 update all act column-wise), so V-blocks keep all cores busy
// at batch 1 with few heads, and every split gives the same results bit for bit; the width is
// chosen per call (common/decode_split.h, VLLM_GDN_CPU_DECODE_SPLIT). Within a block the state is
// walked in column tiles of up to kTileVecs vectors:
//   pass 1 (streams the tile from memory):  a = S^T k,  b = S^T q      (accumulators in registers)
//            v_new = beta * (v - decay * a),  o = decay * b + (k.q) * v_new
//   pass 2 (the tile is now in L1):          S = decay * S + k (x) v_new
// (q is pre-scaled, so o equals scale * S_new^T q.) bf16/fp16 states are converted in registers;
// across the tokens of one sequence (speculative decoding) the tile stays in an fp32 buffer and is
// rounded to the state dtype once, after the last token.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "common/decode_split.h"
#include "common/gating.h"
#include "common/parallel.h"

namespace gdn {
namespace GDN_ISA {
namespace {

// A tile as wide as the registers allow (2 accumulators per vector): 128 columns with AVX-512, so
// pass 1 streams whole state rows of the common V = 128 contiguously.
constexpr int kTileVecs = kVecWidth == 16 ? 8 : 4;
constexpr int64_t kTile = kTileVecs * kVecWidth;
// Software prefetch of pass 1: 8 KiB of state ahead of the row being read, into L2 (measured on
// this Xeon: into L1, or 4 KiB ahead, streams 10-15% slower; the hardware prefetchers alone, slower
// still for bf16 states).
constexpr int64_t kPrefetchBytes = 8192;
constexpr int kPrefetchLocality = 2;  // __builtin_prefetch's: 2 = prefetcht1

// The bytes of a block (rows of `row_bytes`, a multiple of kStep, `ld_bytes` apart) in row-major
// order, kStep bytes a call: a linear prefetch stream over the next task's block.
template <int64_t kStep>
class BlockCursor {
 public:
  BlockCursor(const void* block, int64_t ld_bytes, int64_t row_bytes)
      : p_(static_cast<const char*>(block)), skip_(ld_bytes - row_bytes), per_row_(row_bytes / kStep),
        left_(skip_ == 0 ? INT64_MAX : per_row_) {}  // contiguous rows: one run
  const char* next() {
    const char* r = p_;
    p_ += kStep;
    if (--left_ == 0) p_ += skip_, left_ = per_row_;
    return r;
  }

 private:
  const char* p_;
  int64_t skip_, per_row_, left_;
};

// Per-token values shared by all tiles of a task.
struct TokenStep {
  const float* k;  // [K] l2-normalised
  const float* q;  // [K] l2-normalised and scaled
  float decay, beta, kq;
};

// Row r of a tile: pass 1 accumulates S^T k and S^T q, pass 2 applies the rank-1 update. With
// kPaired (bf16 states on AVX-512 without AVX512-BF16 and on AVX2, in-place only) vectors 2j and
// 2j + 1 hold the even and the odd columns of columns [2jW, 2jW + 2W), W = kVecWidth (see
// vload_bf16_pair); v_new and the accumulators follow.
template <class TSrc, class TDst>
constexpr bool kPaired = kHasBf16Pairs && std::is_same_v<TSrc, bf16_t> && std::is_same_v<TDst, bf16_t>;

template <int NV, bool Paired, class TSrc>
inline void accumulate_row(const TSrc* row, vfloat kr, vfloat qr, vfloat* acc_k, vfloat* acc_q) {
  for (int n = 0; n < NV; n += (Paired ? 2 : 1)) {
    vfloat x[2];
    if constexpr (Paired) {
      vload_bf16_pair(row + n * kVecWidth, x[0], x[1]);
    } else {
      x[0] = vload_float(row + n * kVecWidth);
    }
    for (int i = 0; i < (Paired ? 2 : 1); ++i) {
      acc_k[n + i] += kr * x[i];
      acc_q[n + i] += qr * x[i];
    }
  }
}
template <int NV, bool Paired, class TSrc, class TDst>
inline void update_row(const TSrc* src, TDst* dst, vfloat decay, vfloat kr, const vfloat* v_new) {
  if constexpr (Paired) {
    for (int n = 0; n < NV; n += 2) {
      vfloat even, odd;
      vload_bf16_pair(src + n * kVecWidth, even, odd);
      vstore_bf16_pair(dst + n * kVecWidth, decay * even + kr * v_new[n], decay * odd + kr * v_new[n + 1]);
    }
  } else {
    for (int n = 0; n < NV; ++n) vstore_float(dst + n * kVecWidth, decay * vload_float(src + n * kVecWidth) + kr * v_new[n]);
  }
}
// Between the passes: v_new = beta * (v - decay * S^T k) and the output.
template <int NV, bool Paired, class TIn>
inline void finish_tile(const TokenStep& s, const vfloat* acc_k, const vfloat* acc_q, const TIn* v, TIn* o,
                        vfloat* v_new) {
  const vfloat decay = vbroadcast(s.decay);
  vfloat vv[NV], oo[NV];
  for (int n = 0; n < NV; ++n) vv[n] = vload_float(v + n * kVecWidth);
  if constexpr (Paired) {
    for (int n = 0; n < NV; n += 2) to_even_odd(vv[n], vv[n + 1], vv[n], vv[n + 1]);
  }
  for (int n = 0; n < NV; ++n) {
    v_new[n] = s.beta * (vv[n] - decay * acc_k[n]);
    oo[n] = decay * acc_q[n] + s.kq * v_new[n];
  }
  if constexpr (Paired) {
    for (int n = 0; n < NV; n += 2) from_even_odd(oo[n], oo[n + 1], oo[n], oo[n + 1]);
  }
  for (int n = 0; n < NV; ++n) vstore_float(o + n * kVecWidth, oo[n]);
}

// Bytes per row of a tile of NV vectors, and how many rows ahead pass 1 prefetches.
template <int NV, class TSrc>
constexpr int64_t kTileBytes = NV * kVecWidth * sizeof(TSrc);
template <int NV, class TSrc>
constexpr int64_t kPrefetchRows = kPrefetchBytes / kTileBytes<NV, TSrc>;

// Pass 1 alone over a tile (acc_k, acc_q start at zero). It is bound by memory latency: rows are
// requested well ahead.
template <int NV, bool Paired, class TSrc>
inline void accumulate_tile(const TokenStep& s, int64_t K, const TSrc* src, int64_t lds, vfloat* acc_k, vfloat* acc_q) {
  for (int n = 0; n < NV; ++n) acc_k[n] = acc_q[n] = vfloat{};
  for (int64_t r = 0; r < K; ++r) {
    prefetch_rows<kPrefetchLocality>(src + (r + kPrefetchRows<NV, TSrc>) * lds, lds, 1, kTileBytes<NV, TSrc>);
    accumulate_row<NV, Paired>(src + r * lds, vbroadcast(s.k[r]), vbroadcast(s.q[r]), acc_k, acc_q);
  }
}
// Pass 2 alone over a tile.
template <int NV, bool Paired, class TSrc, class TDst>
inline void update_tile(const TokenStep& s, int64_t K, const TSrc* src, int64_t lds, TDst* dst, int64_t ldd,
                        const vfloat* v_new) {
  const vfloat decay = vbroadcast(s.decay);
  for (int64_t r = 0; r < K; ++r) update_row<NV, Paired>(src + r * lds, dst + r * ldd, decay, vbroadcast(s.k[r]), v_new);
}

// One token over one tile of NV vectors starting at column 0 of src/dst, both passes in turn.
// src and dst may be the same memory (in-place update).
template <int NV, class TSrc, class TDst, class TIn>
inline void step_tile(const TokenStep& s, int64_t K, const TSrc* src, int64_t lds, TDst* dst, int64_t ldd,
                      const TIn* v, TIn* o) {
  vfloat acc_k[NV], acc_q[NV], v_new[NV];
  accumulate_tile<NV, false>(s, K, src, lds, acc_k, acc_q);
  finish_tile<NV, false>(s, acc_k, acc_q, v, o, v_new);
  update_tile<NV, false>(s, K, src, lds, dst, ldd, v_new);
}

// Scalar version for a last tile narrower than one vector (V not a multiple of the vector width).
template <class TSrc, class TDst, class TIn>
void step_columns(const TokenStep& s, int64_t K, int64_t width, const TSrc* src, int64_t lds, TDst* dst,
                  int64_t ldd, const TIn* v, TIn* o) {
  for (int64_t j = 0; j < width; ++j) {
    float a = 0.f, b = 0.f;
    for (int64_t r = 0; r < K; ++r) {
      const float x = to_float(src[r * lds + j]);
      a += s.k[r] * x;
      b += s.q[r] * x;
    }
    const float v_new = s.beta * (to_float(v[j]) - s.decay * a);
    o[j] = from_float<TIn>(s.decay * b + s.kq * v_new);
    for (int64_t r = 0; r < K; ++r) dst[r * ldd + j] = from_float<TDst>(s.decay * to_float(src[r * lds + j]) + s.k[r] * v_new);
  }
}

// One token over columns [0, width) of a block.
template <class TSrc, class TDst, class TIn>
void step_block(const TokenStep& s, int64_t K, int64_t width, const TSrc* src, int64_t lds, TDst* dst, int64_t ldd,
                const TIn* v, TIn* o) {
  int64_t j = 0;
  for (; j + kTile <= width; j += kTile)
    step_tile<kTileVecs>(s, K, src + j, lds, dst + j, ldd, v + j, o + j);
  for (; j + 4 * kVecWidth <= width; j += 4 * kVecWidth)
    step_tile<4>(s, K, src + j, lds, dst + j, ldd, v + j, o + j);
  for (; j + kVecWidth <= width; j += kVecWidth) step_tile<1>(s, K, src + j, lds, dst + j, ldd, v + j, o + j);
  if (j < width) step_columns(s, K, width - j, src + j, lds, dst + j, ldd, v + j, o + j);
}

// Normalised, scaled q and k of token t for key heads [hk0, hk1) (2K floats each: q then k, into
// qk) with k.q (into kq), and the gates of value heads [h0, h1): decay = exp(g) and beta.
template <class TIn>
void prepare_token(const RecurrentParams& p, int64_t t, int64_t hk0, int64_t hk1, int64_t h0, int64_t h1, float* qk,
                   float* kq, float* decay, float* beta) {
  const int64_t K = p.K;
  for (int64_t hk = hk0; hk < hk1; ++hk) {
    float* qf = qk + (hk - hk0) * 2 * K;
    float* kf = qf + K;
    load_row(p.q.row<const TIn>(t, hk), qf, K);
    load_row(p.k.row<const TIn>(t, hk), kf, K);
    if (p.use_qk_l2norm) {
      l2normalize(qf, K, p.scale);
      l2normalize(kf, K, 1.f);
    } else {
      for (int64_t i = 0; i < K; ++i) qf[i] *= p.scale;
    }
    kq[hk - hk0] = dot(kf, qf, K);
  }
  gate_range(p.gate, t, h0, h1, decay, beta);
  exp_affine(decay, h1 - h0, 1.f, 0.f, decay);
}

// prepare_token's results for the heads of one token, and the TokenStep of one value head.
struct PreparedToken {
  float *qk, *kq, *decay, *beta;
  int64_t hk0, h0, ratio, K;
  static int64_t floats(int64_t num_hk, int64_t ratio, int64_t K) { return num_hk * (2 * K + 1 + 2 * ratio); }
  PreparedToken(float* buffer, int64_t num_hk, int64_t hk0, int64_t h0, int64_t ratio, int64_t K)
      : qk(buffer), kq(qk + num_hk * 2 * K), decay(kq + num_hk), beta(decay + (num_hk * ratio)), hk0(hk0), h0(h0),
        ratio(ratio), K(K) {}
  TokenStep step(int64_t h) const {
    const int64_t i = h / ratio - hk0;
    return TokenStep{qk + i * 2 * K + K, qk + i * 2 * K, decay[h - h0], beta[h - h0], kq[i]};
  }
};

// A task is one (sequence, value head, V-block).
struct TaskGrid {
  int64_t Hv, vb, n_vblocks;
  int64_t seq(int64_t task) const { return task / (Hv * n_vblocks); }
  int64_t head(int64_t task) const { return (task / n_vblocks) % Hv; }
  int64_t v0(int64_t task) const { return (task % n_vblocks) * vb; }
};

template <class TIn>
void zero_output(const RecurrentParams& p, int64_t t, int64_t h, int64_t v0, int64_t width) {
  std::fill_n(p.out.row<TIn>(t, h) + v0, width, from_float<TIn>(0.f));
}

// Plain decode (one token per sequence), software-pipelined over the thread's tiles in order: pass 1
// of a tile (reading it from memory) runs row by row together with pass 2 of the tile before it
// (updating that one from cache), so memory streams while the updates are computed, as in a
// plain read-modify-write stream. Every tile is NV vectors wide (the caller checks V and vb).
// Tasks go to the threads as at::parallel_for's consecutive ranges (static) or, with `dynamic`, one
// at a time from a shared counter in task order: the fork wakes the threads one after another, and
// with few tasks per thread (batch 1) the threads that start first then take the late ones' share.
template <int NV, class TIn, class TState>
void stream_decode(const RecurrentParams& p, const TaskGrid& grid, bool dynamic) {
  const int64_t K = p.K, V = p.V, ratio = p.Hv / p.Hk, tasks_per_seq = grid.Hv * grid.n_vblocks;
  constexpr int64_t kTileCols = NV * kVecWidth, kRowBytes = kTileBytes<NV, TState>;
  constexpr int64_t kAhead = kPrefetchRows<NV, TState>;
  constexpr bool kLinearPrefetch = kRowBytes == 64;  // see below
  constexpr bool Paired = kPaired<TState, TState>;
  const int64_t n_tasks = p.N * tasks_per_seq;
  std::atomic<int64_t> counter{0};
  parallel_for(dynamic ? std::min<int64_t>(n_tasks, num_threads()) : n_tasks, 1, [&](int64_t begin, int64_t end) {
    // Local copies of the captured sizes: the state stores (vector types, which may alias anything)
    // would otherwise make the compiler reload them through the closure on every row.
    const int64_t K = p.K, V = p.V;
    // This thread's tasks in order. Static: known one ahead (the next one's block is prefetched
    // while this one ends). Dynamic: each taken when the last is done (taking one ahead would hand
    // out all tasks as the first threads wake when there are two per thread); nothing is
    // prefetched past a block then.
    int64_t cursor = begin;
    auto take = [&]() -> int64_t {
      if (!dynamic) return cursor < end ? cursor++ : -1;
      const int64_t t = counter.fetch_add(1, std::memory_order_relaxed);
      return t < n_tasks ? t : -1;
    };
    auto advance = [&](int64_t& task, int64_t& next_task) {
      if (dynamic) {
        task = take();
      } else {
        task = next_task;
        next_task = task >= 0 ? take() : -1;
      }
    };
    // Tokens are prepared a sequence at a time (the heads of this range, gates vectorised; one head
    // when dynamic), two buffers, as the previous tile's token stays in use while the next one is
    // prepared.
    const int64_t buffer_floats = PreparedToken::floats(p.Hk, ratio, K);
    float* scratch = thread_scratch(2 * buffer_floats);
    int buffer = 0;
    PreparedToken token(scratch, 0, 0, 0, ratio, K);
    int64_t token_seq = -1, token_h_last = -1;
    TState* prev = nullptr;  // the tile awaiting pass 2, and its token
    TokenStep prev_step{};
    vfloat v_new[NV];
    auto block_of = [&](int64_t task) -> TState* {
      const int64_t slot = p.state_indices[grid.seq(task)];
      if (slot < 0) return nullptr;
      return static_cast<TState*>(p.state.data) + slot * p.state.slot_stride + grid.head(task) * K * V + grid.v0(task);
    };
    for (int64_t task = take(), next_task = dynamic || task < 0 ? -1 : take(); task >= 0;
         advance(task, next_task)) {
      const int64_t seq = grid.seq(task), h = grid.head(task), v0 = grid.v0(task);
      const int64_t width = std::min(grid.vb, V - v0);
      TState* block = block_of(task);
      if (block == nullptr) {  // padding: zero output, touch no state
        zero_output<TIn>(p, seq, h, v0, width);
        continue;
      }
      const TState* next_block = next_task >= 0 ? block_of(next_task) : nullptr;
      // Where a tile row is one 64-byte line (2-byte states on AVX2: 32 columns of a 256-byte row),
      // walking the block as column strips reads one line in four of every row, and prefetching
      // those strips ahead streamed 20-35% slower (cold states) than requesting the next task's
      // block whole, line after line, while this one runs. Two-line tile rows (fp32 on AVX2)
      // measured the other way round (15-20% slower linear), and tiles as wide as the block
      // (AVX-512) are that linear stream already.
      BlockCursor<kRowBytes> ahead = kLinearPrefetch && next_block  // (no next block: this one again)
          ? BlockCursor<kRowBytes>(next_block, V * int64_t(sizeof(TState)),
                                   std::min(grid.vb, V - grid.v0(next_task)) * int64_t(sizeof(TState)))
          : BlockCursor<kRowBytes>(block, V * int64_t(sizeof(TState)), width * int64_t(sizeof(TState)));
      if (seq != token_seq || h > token_h_last) {
        prefetch_rows<kPrefetchLocality>(block, V, kAhead, kRowBytes);  // in flight while the token is prepared
        const int64_t h_last = dynamic ? h : grid.head(std::min(end, (seq + 1) * tasks_per_seq) - 1);
        const int64_t hk0 = h / ratio, hk1 = h_last / ratio + 1;
        token = PreparedToken(scratch + buffer * buffer_floats, hk1 - hk0, hk0, h, ratio, K);
        prepare_token<TIn>(p, seq, hk0, hk1, h, h_last + 1, token.qk, token.kq, token.decay, token.beta);
        buffer ^= 1;
        token_seq = seq, token_h_last = h_last;
      }
      const TokenStep s = token.step(h);
      const TIn* v = p.v.row<const TIn>(seq, h) + v0;
      TIn* o = p.out.row<TIn>(seq, h) + v0;
      for (int64_t j = 0; j < width; j += kTileCols) {
        TState* tile = block + j;
        vfloat acc_k[NV], acc_q[NV];
        if (prev) {  // both passes, row by row
          for (int n = 0; n < NV; ++n) acc_k[n] = acc_q[n] = vfloat{};
          const vfloat prev_decay = vbroadcast(prev_step.decay);
          auto both_passes = [&](int64_t r, const TState* ahead) {
            prefetch_rows<kPrefetchLocality>(ahead, V, 1, kRowBytes);
            accumulate_row<NV, Paired>(tile + r * V, vbroadcast(s.k[r]), vbroadcast(s.q[r]), acc_k, acc_q);
            update_row<NV, Paired>(prev + r * V, prev + r * V, prev_decay, vbroadcast(prev_step.k[r]), v_new);
          };
          if constexpr (kLinearPrefetch) {
            for (int64_t r = 0; r < K; ++r) both_passes(r, reinterpret_cast<const TState*>(ahead.next()));
          } else {
            // The prefetches run kAhead rows ahead in the order tiles are walked: past the tile's
            // last row, into the next column tile of the block (tiles narrower than the block), or
            // after the block's last tile into this thread's next block (static; if none, the block
            // below; dynamic: this tile again, already in cache).
            const TState* next = j + kTileCols < width ? tile + kTileCols
                                 : next_block           ? next_block
                                 : dynamic              ? tile
                                                        : block + K * V;
            const int64_t split = std::max<int64_t>(K - kAhead, 0);
            int64_t r = 0;
            for (; r < split; ++r) both_passes(r, tile + (r + kAhead) * V);
            for (; r < K; ++r) both_passes(r, next + (r + kAhead - K) * V);
          }
        } else if constexpr (kLinearPrefetch) {  // the thread's first tile
          // Its first rows were requested with the token; the block's other column tiles go out
          // 16 rows ahead, with the next block's stream, while this tile is read (5% at batch 1).
          for (int n = 0; n < NV; ++n) acc_k[n] = acc_q[n] = vfloat{};
          constexpr int64_t kRowsAhead = 16;
          const int64_t rest = (width - kTileCols) * int64_t(sizeof(TState));
          if (rest > 0) prefetch_rows<kPrefetchLocality>(tile + kTileCols, V, kRowsAhead, rest);
          for (int64_t r = 0; r < K; ++r) {
            if (rest > 0) prefetch_rows<kPrefetchLocality>(tile + kTileCols + (r + kRowsAhead) * V, V, 1, rest);
            prefetch_rows<kPrefetchLocality>(ahead.next(), V, 1, kRowBytes);
            accumulate_row<NV, Paired>(tile + r * V, vbroadcast(s.k[r]), vbroadcast(s.q[r]), acc_k, acc_q);
          }
        } else {  // the thread's first tile
          accumulate_tile<NV, Paired>(s, K, tile, V, acc_k, acc_q);
        }
        finish_tile<NV, Paired>(s, acc_k, acc_q, v + j, o + j, v_new);
        prev = tile;
        prev_step = s;
      }
    }
    if (prev) update_tile<NV, Paired>(prev_step, K, prev, V, prev, V, v_new);  // the thread's last tile
  });
}

// General case (several tokens per sequence: speculative decoding): one tile at a time, the block
// kept in fp32 across the tokens of a sequence.
template <class TIn, class TState>
void multi_token_decode(const RecurrentParams& p, const TaskGrid& grid) {
  const int64_t K = p.K, V = p.V, vb = grid.vb, ratio = p.Hv / p.Hk;
  parallel_for(p.N * grid.Hv * grid.n_vblocks, 1, [&](int64_t begin, int64_t end) {
    float* scratch = thread_scratch(PreparedToken::floats(1, ratio, K) + K * vb);
    float* local = scratch + PreparedToken::floats(1, ratio, K);  // fp32 copy of the block across tokens

    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = grid.seq(task), h = grid.head(task), v0 = grid.v0(task);
      const int64_t width = std::min(vb, V - v0);
      const int64_t bos = p.cu_seqlens ? p.cu_seqlens[seq] : seq;
      const int64_t eos = p.cu_seqlens ? p.cu_seqlens[seq + 1] : seq + 1;
      const int64_t slot = p.state_indices[seq];
      if (slot < 0) {  // padding: zero output, touch no state
        for (int64_t t = bos; t < eos; ++t) zero_output<TIn>(p, t, h, v0, width);
        continue;
      }
      TState* S = static_cast<TState*>(p.state.data) + slot * p.state.slot_stride + h * K * V + v0;

      for (int64_t t = bos; t < eos; ++t) {
        const PreparedToken token(scratch, 1, h / ratio, h, ratio, K);
        prepare_token<TIn>(p, t, h / ratio, h / ratio + 1, h, h + 1, token.qk, token.kq, token.decay, token.beta);
        const TokenStep s = token.step(h);
        const TIn* vt = p.v.row<const TIn>(t, h) + v0;
        TIn* o = p.out.row<TIn>(t, h) + v0;
        const bool first = t == bos, last = t == eos - 1;
        if (first && last) {
          step_block(s, K, width, S, V, S, V, vt, o);
        } else if (first) {
          step_block(s, K, width, S, V, local, vb, vt, o);
        } else if (last) {
          step_block(s, K, width, static_cast<const float*>(local), vb, S, V, vt, o);
        } else {
          step_block(s, K, width, static_cast<const float*>(local), vb, local, vb, vt, o);
        }
      }
    }
  });
}

template <class TIn, class TState>
void recurrent_kernel(const RecurrentParams& p) {
  // V-blocks (decode_split.h): whole heads, or blocks as narrow as one vector where few large heads
  // would leave threads idle for long.
  // (bf16 states walked as even/odd column pairs need tiles of whole pairs of vectors.)
  constexpr bool Paired = kPaired<TState, TState>;
  const int64_t vb = decode_v_block(p.N * p.Hv, p.V, (Paired ? 2 : 1) * kVecWidth, num_threads(),
                                    p.K * int64_t(sizeof(TState)));
  const bool dynamic = decode_dynamic_claim(p.N * p.Hv * ((p.V + vb - 1) / vb), num_threads());
  const TaskGrid grid{p.Hv, vb, (p.V + vb - 1) / vb};
  bool one_token_each = true;
  for (int64_t i = 0; p.cu_seqlens && i < p.N && one_token_each; ++i)
    one_token_each = p.cu_seqlens[i] == i && p.cu_seqlens[i + 1] == i + 1;
  auto fits = [&](int64_t cols) { return p.V % cols == 0 && vb % cols == 0; };
  if (one_token_each && fits(kTile)) {
    stream_decode<kTileVecs, TIn, TState>(p, grid, dynamic);
  } else if (one_token_each && fits(4 * kVecWidth)) {
    stream_decode<4, TIn, TState>(p, grid, dynamic);
  } else if (one_token_each && fits(2 * kVecWidth)) {
    stream_decode<2, TIn, TState>(p, grid, dynamic);
  } else if (one_token_each && !Paired && fits(kVecWidth)) {
    if constexpr (!Paired) stream_decode<1, TIn, TState>(p, grid, dynamic);
  } else {
    multi_token_decode<TIn, TState>(p, grid);
  }
}

}  // namespace

void fused_recurrent(const RecurrentParams& p) {
  dispatch_dtype(p.q.dtype, [&](auto in_tag) {
    dispatch_dtype(p.state.dtype, [&](auto state_tag) {
      recurrent_kernel<decltype(in_tag), decltype(state_tag)>(p);
    });
  });
}

}  // namespace GDN_ISA
}  // namespace gdn
