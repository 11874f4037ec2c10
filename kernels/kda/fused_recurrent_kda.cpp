// fused_recurrent_kda: KDA decode (and the token-by-token path for short sequences), the gate
// computed inside from (A_log, dt_bias, f, b). Memory-bound like GDN's decode: each token of each
// sequence reads and writes its whole [K, V] state once. Per token (q l2-normalised and scaled, k
// l2-normalised, decay_r = exp(g_r) per state row r):
//   pass 1 (streams a column tile of S):  a = S^T (decay k),  b = S^T (decay q)
//            v_new = beta (v - a),  o = b + (k.q) v_new
//   pass 2 (the tile again, from cache):  S_r = decay_r S_r + k_r v_new
// (o = q^T S_new.) A task is one (sequence, head, block of state columns); columns are independent,
// so any split gives the same results bit for bit. bf16/fp16 states are converted in registers;
// across the tokens of one sequence the block stays in an fp32 buffer and is rounded once at the end.
#include <algorithm>
#include <cmath>

#include "common/parallel.h"
#include "kda/gate.h"

namespace gdn {
namespace GDN_ISA {
namespace {

constexpr int kTileVecs = kVecWidth == 16 ? 8 : 4;  // 2 accumulators per vector fit the registers
constexpr int64_t kTile = kTileVecs * kVecWidth;
constexpr int64_t kPrefetchBytes = 8192;  // pass 1 requests state rows this far ahead (into L2)

struct Token {
  const float *kd, *qd, *k, *decay;  // [K] each
  float beta, kq;
};

template <int NV, class TSrc, class TDst, class TIn>
inline void step_tile(const Token& s, int64_t K, const TSrc* src, int64_t lds, TDst* dst, int64_t ldd, const TIn* v,
                      TIn* o) {
  constexpr int64_t kRowBytes = NV * kVecWidth * sizeof(TSrc);
  constexpr int64_t kAhead = kPrefetchBytes / kRowBytes;
  vfloat acc_k[NV], acc_q[NV], v_new[NV];
  for (int n = 0; n < NV; ++n) acc_k[n] = acc_q[n] = vfloat{};
  for (int64_t r = 0; r < K; ++r) {
    prefetch_rows<2>(src + (r + kAhead) * lds, lds, 1, kRowBytes);
    const vfloat kr = vbroadcast(s.kd[r]), qr = vbroadcast(s.qd[r]);
    for (int n = 0; n < NV; ++n) {
      const vfloat x = vload_float(src + r * lds + n * kVecWidth);
      acc_k[n] += kr * x;
      acc_q[n] += qr * x;
    }
  }
  for (int n = 0; n < NV; ++n) {
    v_new[n] = s.beta * (vload_float(v + n * kVecWidth) - acc_k[n]);
    vstore_float(o + n * kVecWidth, acc_q[n] + s.kq * v_new[n]);
  }
  for (int64_t r = 0; r < K; ++r) {
    const vfloat dr = vbroadcast(s.decay[r]), kr = vbroadcast(s.k[r]);
    for (int n = 0; n < NV; ++n)
      vstore_float(dst + r * ldd + n * kVecWidth, dr * vload_float(src + r * lds + n * kVecWidth) + kr * v_new[n]);
  }
}

// Columns narrower than one vector.
template <class TSrc, class TDst, class TIn>
void step_columns(const Token& s, int64_t K, int64_t width, const TSrc* src, int64_t lds, TDst* dst, int64_t ldd,
                  const TIn* v, TIn* o) {
  for (int64_t j = 0; j < width; ++j) {
    float a = 0.f, b = 0.f;
    for (int64_t r = 0; r < K; ++r) {
      const float x = to_float(src[r * lds + j]);
      a += s.kd[r] * x;
      b += s.qd[r] * x;
    }
    const float v_new = s.beta * (to_float(v[j]) - a);
    o[j] = from_float<TIn>(b + s.kq * v_new);
    for (int64_t r = 0; r < K; ++r)
      dst[r * ldd + j] = from_float<TDst>(s.decay[r] * to_float(src[r * lds + j]) + s.k[r] * v_new);
  }
}

template <class TSrc, class TDst, class TIn>
void step_block(const Token& s, int64_t K, int64_t width, const TSrc* src, int64_t lds, TDst* dst, int64_t ldd,
                const TIn* v, TIn* o) {
  int64_t j = 0;
  for (; j + kTile <= width; j += kTile) step_tile<kTileVecs>(s, K, src + j, lds, dst + j, ldd, v + j, o + j);
  for (; j + 4 * kVecWidth <= width; j += 4 * kVecWidth)
    step_tile<4>(s, K, src + j, lds, dst + j, ldd, v + j, o + j);
  for (; j + kVecWidth <= width; j += kVecWidth) step_tile<1>(s, K, src + j, lds, dst + j, ldd, v + j, o + j);
  if (j < width) step_columns(s, K, width - j, src + j, lds, dst + j, ldd, v + j, o + j);
}

// sum x * y in vector lanes (the generic dot's reduction stays a scalar FMA chain here: ~4 cycles
// per element, 10% of a batch-1 step's time).
inline float vdot(const float* x, const float* y, int64_t n) {
  vfloat acc{};
  int64_t i = 0;
  for (; i + kVecWidth <= n; i += kVecWidth) acc += vload(x + i) * vload(y + i);
  float s = 0.f;
  for (int l = 0; l < kVecWidth; ++l) s += acc[l];
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

inline void l2norm_scale(float* x, int64_t n, float mul) {
  const float r = mul / std::sqrt(vdot(x, x, n) + kL2NormEps);
  for (int64_t i = 0; i < n; ++i) x[i] *= r;
}

// q, k, gates of token t, head h into buf (5 K floats).
template <class TIn>
Token prepare_token(const KdaParams& p, int64_t t, int64_t h, float* buf) {
  const int64_t K = p.K;
  float *q = buf, *k = buf + K, *decay = buf + 2 * K, *kd = buf + 3 * K, *qd = buf + 4 * K;
  load_row(p.q.row<const TIn>(t, h), q, K);
  load_row(p.k.row<const TIn>(t, h), k, K);
  if (p.use_qk_l2norm) {
    l2norm_scale(q, K, p.scale);
    l2norm_scale(k, K, 1.f);
  } else {
    for (int64_t i = 0; i < K; ++i) q[i] *= p.scale;
  }
  kda_gate_row(p.gate, t, h, decay);
  exp_affine(decay, K, 1.f, 0.f, decay);
  for (int64_t i = 0; i < K; ++i) kd[i] = k[i] * decay[i], qd[i] = q[i] * decay[i];
  return Token{kd, qd, k, decay, kda_beta(p.gate, t, h), vdot(k, q, K)};
}

// One token per sequence, software-pipelined over the thread's tiles in order (as GDN's decode):
// pass 1 of a tile (streaming it from memory) runs row by row together with pass 2 of the tile
// before it (updating that one from cache), so the reads stream while the updates are computed.
// Every tile is NV vectors wide (the caller checks V and vb).
template <int NV, class TIn, class TState>
void stream_decode(const KdaParams& p, int64_t vb, int64_t nvb) {
  constexpr int64_t kTileCols = NV * kVecWidth, kRowBytes = kTileCols * sizeof(TState);
  constexpr int64_t kAhead = kPrefetchBytes / kRowBytes;
  parallel_for(p.N * p.H * nvb, 1, [&](int64_t begin, int64_t end) {
    const int64_t K = p.K, V = p.V;
    float* buffers = thread_scratch(2 * 5 * K);  // two tokens: the previous tile's stays in use
    int buffer = 0;
    TState* prev = nullptr;  // the tile awaiting pass 2, and its token
    Token prev_token{};
    vfloat v_new[NV];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / (p.H * nvb), h = task / nvb % p.H, v0 = task % nvb * vb;
      const int64_t width = std::min(vb, V - v0);
      const int64_t slot = p.state_indices[seq];
      if (slot < 0) {  // padding: zero output, touch no state
        std::fill_n(p.out.row<TIn>(seq, h) + v0, width, from_float<TIn>(0.f));
        continue;
      }
      TState* block = static_cast<TState*>(p.state.data) + slot * p.state.slot_stride + h * K * V + v0;
      prefetch_rows<2>(block, V, kAhead, kRowBytes);  // in flight while the token is prepared
      const Token s = prepare_token<TIn>(p, seq, h, buffers + buffer * 5 * K);
      buffer ^= 1;
      const TIn* v = p.v.row<const TIn>(seq, h) + v0;
      TIn* o = p.out.row<TIn>(seq, h) + v0;
      for (int64_t j = 0; j < width; j += kTileCols) {
        TState* tile = block + j;
        vfloat acc_k[NV], acc_q[NV];
        for (int n = 0; n < NV; ++n) acc_k[n] = acc_q[n] = vfloat{};
        for (int64_t r = 0; r < K; ++r) {
          prefetch_rows<2>(tile + (r + kAhead) * V, V, 1, kRowBytes);
          const vfloat kr = vbroadcast(s.kd[r]), qr = vbroadcast(s.qd[r]);
          for (int n = 0; n < NV; ++n) {
            const vfloat x = vload_float(tile + r * V + n * kVecWidth);
            acc_k[n] += kr * x;
            acc_q[n] += qr * x;
          }
          if (prev) {
            const vfloat dr = vbroadcast(prev_token.decay[r]), pk = vbroadcast(prev_token.k[r]);
            TState* row = prev + r * V;
            for (int n = 0; n < NV; ++n)
              vstore_float(row + n * kVecWidth, dr * vload_float(row + n * kVecWidth) + pk * v_new[n]);
          }
        }
        for (int n = 0; n < NV; ++n) {
          v_new[n] = s.beta * (vload_float(v + j + n * kVecWidth) - acc_k[n]);
          vstore_float(o + j + n * kVecWidth, acc_q[n] + s.kq * v_new[n]);
        }
        prev = tile;
        prev_token = s;
      }
    }
    if (prev) {  // the thread's last tile
      for (int64_t r = 0; r < K; ++r) {
        const vfloat dr = vbroadcast(prev_token.decay[r]), pk = vbroadcast(prev_token.k[r]);
        TState* row = prev + r * V;
        for (int n = 0; n < NV; ++n)
          vstore_float(row + n * kVecWidth, dr * vload_float(row + n * kVecWidth) + pk * v_new[n]);
      }
    }
  });
}

template <class TIn, class TState>
void recurrent_kernel(const KdaParams& p) {
  const int64_t K = p.K, V = p.V, threads = num_threads();
  if (p.N == 0) return;
  // Whole heads where there are enough (sequence, head) tasks for the threads, else column blocks
  // of whole vectors so that at batch 1 with few heads every thread streams its share.
  const int64_t heads = p.N * p.H, splits = std::max<int64_t>(1, (2 * threads + heads - 1) / heads);
  const int64_t vb = std::min(V, std::max<int64_t>(kVecWidth, ((V + splits - 1) / splits + kVecWidth - 1) /
                                                                  kVecWidth * kVecWidth));
  const int64_t nvb = (V + vb - 1) / vb;
  bool one_token_each = true;
  for (int64_t i = 0; p.cu_seqlens && i < p.N && one_token_each; ++i)
    one_token_each = p.cu_seqlens[i] == i && p.cu_seqlens[i + 1] == i + 1;
  auto fits = [&](int64_t cols) { return V % cols == 0 && vb % cols == 0; };
  if (one_token_each && fits(kTile)) return stream_decode<kTileVecs, TIn, TState>(p, vb, nvb);
  if (one_token_each && fits(4 * kVecWidth)) return stream_decode<4, TIn, TState>(p, vb, nvb);
  if (one_token_each && fits(kVecWidth)) return stream_decode<1, TIn, TState>(p, vb, nvb);
  parallel_for(p.N * p.H * nvb, 1, [&](int64_t begin, int64_t end) {
    float* buf = thread_scratch(5 * K + K * vb);
    float* local = buf + 5 * K;  // fp32 copy of the block across the tokens of one sequence
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / (p.H * nvb), h = task / nvb % p.H, v0 = task % nvb * vb;
      const int64_t width = std::min(vb, V - v0);
      const int64_t bos = p.cu_seqlens ? p.cu_seqlens[seq] : seq;
      const int64_t eos = p.cu_seqlens ? p.cu_seqlens[seq + 1] : seq + 1;
      const int64_t slot = p.state_indices[seq];
      if (slot < 0) {  // padding: zero output, touch no state
        for (int64_t t = bos; t < eos; ++t) std::fill_n(p.out.row<TIn>(t, h) + v0, width, from_float<TIn>(0.f));
        continue;
      }
      TState* S = static_cast<TState*>(p.state.data) + slot * p.state.slot_stride + h * K * V + v0;
      for (int64_t t = bos; t < eos; ++t) {
        const Token s = prepare_token<TIn>(p, t, h, buf);
        const TIn* v = p.v.row<const TIn>(t, h) + v0;
        TIn* o = p.out.row<TIn>(t, h) + v0;
        const bool first = t == bos, last = t == eos - 1;
        if (first && last) {
          step_block(s, K, width, S, V, S, V, v, o);
        } else if (first) {
          step_block(s, K, width, static_cast<const TState*>(S), V, local, vb, v, o);
        } else if (last) {
          step_block(s, K, width, static_cast<const float*>(local), vb, S, V, v, o);
        } else {
          step_block(s, K, width, static_cast<const float*>(local), vb, local, vb, v, o);
        }
      }
    }
  });
}

}  // namespace

void fused_recurrent_kda(const KdaParams& p) {
  dispatch_dtype(p.q.dtype, [&](auto in_tag) {
    dispatch_dtype(p.state.dtype, [&](auto state_tag) {
      recurrent_kernel<decltype(in_tag), decltype(state_tag)>(p);
    });
  });
}

}  // namespace GDN_ISA
}  // namespace gdn
