// fused_recurrent_gated_delta_rule: decode. Memory-bound: every token of every sequence reads and
// writes its whole [K, V] state, so the kernel is built to touch DRAM once per state byte.
//
// Each task owns one (sequence, value head, V-block). Columns of the state are independent in every
// step (S^T k, S^T q and the rank-1 update all act column-wise), so V-blocks keep all cores busy
// at batch 1. Within a block the state is walked in column tiles of kTileVecs vectors:
//   pass 1 (streams the tile from memory):  a = S^T k,  b = S^T q      (accumulators in registers)
//            v_new = beta * (v - decay * a),  o = decay * b + (k.q) * v_new
//   pass 2 (the tile is now in L1):          S = decay * S + k (x) v_new
// (q is pre-scaled, so o equals scale * S_new^T q.) bf16/fp16 states are converted in registers;
// across the tokens of one sequence (speculative decoding) the tile stays in an fp32 buffer and is
// rounded to the state dtype once, after the last token.
#include <algorithm>
#include <type_traits>

#include "common/gating.h"
#include "common/parallel.h"

namespace gdn {
namespace GDN_ISA {
namespace {

// A tile as wide as the registers allow (2 accumulators per vector): 128 columns with AVX-512, so
// pass 1 streams whole state rows of the common V = 128 contiguously.
constexpr int kTileVecs = kVecWidth == 16 ? 8 : 4;
constexpr int64_t kTile = kTileVecs * kVecWidth;
constexpr int64_t kPrefetchRows = 12;

// Per-token values shared by all tiles of a task.
struct TokenStep {
  const float* k;  // [K] l2-normalised
  const float* q;  // [K] l2-normalised and scaled
  float decay, beta, kq;
};

// One token over one tile of `nv` vectors (nv <= kTileVecs) starting at column 0 of src/dst.
// src and dst may be the same memory (in-place update).
template <int NV, class TSrc, class TDst, class TIn>
inline void step_tile(const TokenStep& s, int64_t K, const TSrc* src, int64_t lds, TDst* dst, int64_t ldd,
                      const TIn* v, TIn* o) {
  vfloat acc_k[NV], acc_q[NV];
  for (int n = 0; n < NV; ++n) acc_k[n] = acc_q[n] = vfloat{};
  constexpr int64_t kTileBytes = NV * kVecWidth * sizeof(TSrc);
  for (int64_t r = 0; r < K; ++r) {
    // Pass 1 is bound by memory latency: request rows well ahead (past the block end this reaches
    // the next head's state, which is contiguous and processed next; prefetches never fault).
    const char* ahead = reinterpret_cast<const char*>(src + (r + kPrefetchRows) * lds);
    for (int64_t b = 0; b < kTileBytes; b += 64) __builtin_prefetch(ahead + b, 0, 3);
    const vfloat kr = vbroadcast(s.k[r]), qr = vbroadcast(s.q[r]);
    for (int n = 0; n < NV; ++n) {
      const vfloat x = vload_float(src + r * lds + n * kVecWidth);
      acc_k[n] += kr * x;
      acc_q[n] += qr * x;
    }
  }
  vfloat v_new[NV];
  const vfloat decay = vbroadcast(s.decay);
  for (int n = 0; n < NV; ++n) {
    v_new[n] = s.beta * (vload_float(v + n * kVecWidth) - decay * acc_k[n]);
    vstore_float(o + n * kVecWidth, decay * acc_q[n] + s.kq * v_new[n]);
  }
  for (int64_t r = 0; r < K; ++r) {
    const vfloat kr = vbroadcast(s.k[r]);
    for (int n = 0; n < NV; ++n) {
      const vfloat x = vload_float(src + r * lds + n * kVecWidth);
      vstore_float(dst + r * ldd + n * kVecWidth, decay * x + kr * v_new[n]);
    }
  }
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

// Largest V-block (all of V, or a multiple of 4 vectors) that still gives every thread a few tasks.
int64_t choose_v_block(int64_t tasks_per_block, int64_t V) {
  const int64_t want = 4 * static_cast<int64_t>(num_threads());
  const int64_t quantum = 4 * kVecWidth;
  int64_t vb = V;
  while (tasks_per_block * ((V + vb - 1) / vb) < want && vb > quantum)
    vb = std::max(quantum, (vb / 2 + quantum - 1) / quantum * quantum);
  return vb;
}

template <class TIn, class TState>
void recurrent_kernel(const RecurrentParams& p) {
  const int64_t K = p.K, V = p.V, Hv = p.Hv, ratio = p.Hv / p.Hk;
  const int64_t vb = choose_v_block(p.N * Hv, V);
  const int64_t n_vblocks = (V + vb - 1) / vb;

  parallel_for(p.N * Hv * n_vblocks, 1, [&](int64_t begin, int64_t end) {
    float* scratch = thread_scratch(2 * K + K * vb);
    float* qf = scratch;
    float* kf = qf + K;
    float* local = kf + K;  // fp32 copy of the block across the tokens of one sequence

    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / (Hv * n_vblocks);
      const int64_t h = (task / n_vblocks) % Hv;
      const int64_t v0 = (task % n_vblocks) * vb;
      const int64_t width = std::min(vb, V - v0);
      const int64_t bos = p.cu_seqlens ? p.cu_seqlens[seq] : seq;
      const int64_t eos = p.cu_seqlens ? p.cu_seqlens[seq + 1] : seq + 1;
      const int64_t slot = p.state_indices[seq];
      TIn* out_base = static_cast<TIn*>(p.out.data) + h * p.out.head_stride + v0;

      if (slot < 0) {  // padding: zero output, touch no state
        for (int64_t t = bos; t < eos; ++t)
          for (int64_t j = 0; j < width; ++j) out_base[t * p.out.token_stride + j] = from_float<TIn>(0.f);
        continue;
      }
      TState* S = static_cast<TState*>(p.state.data) + slot * p.state.slot_stride + h * K * V + v0;

      for (int64_t t = bos; t < eos; ++t) {
        const int64_t hk = h / ratio;
        load_row(static_cast<const TIn*>(p.q.data) + t * p.q.token_stride + hk * p.q.head_stride, qf, K);
        load_row(static_cast<const TIn*>(p.k.data) + t * p.k.token_stride + hk * p.k.head_stride, kf, K);
        if (p.use_qk_l2norm) {
          l2normalize(qf, K, p.scale);
          l2normalize(kf, K, 1.f);
        } else {
          for (int64_t i = 0; i < K; ++i) qf[i] *= p.scale;
        }
        TokenStep s{kf, qf, 0.f, 0.f, dot(kf, qf, K)};
        float g;
        gate_values(p.gate, t, h, &g, &s.beta);
        s.decay = std::exp(g);
        const TIn* vt = static_cast<const TIn*>(p.v.data) + t * p.v.token_stride + h * p.v.head_stride + v0;
        TIn* o = out_base + t * p.out.token_stride;
        const bool first = t == bos, last = t == eos - 1;
        if (first && last) {
          step_block(s, K, width, S, V, S, V, vt, o);  // the common decode case: in place
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
