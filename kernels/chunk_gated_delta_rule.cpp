// chunk_gated_delta_rule: prefill with the chunked (WY / UT-transform) form of the gated delta
// rule, as in flash-linear-attention. One task = one (sequence, value head); it walks its chunks of
// C tokens in order, carrying the fp32 state S [K, V]. Per chunk (q pre-scaled, gc = cumsum(g)):
//   L[i,j]  = beta_i (k_i.k_j) exp(gc_i - gc_j)          j < i
//   Tm      = (I + L)^-1                                  (forward substitution)
//   u       = Tm (beta * v),   w = Tm (beta * exp(gc) * k)
//   v_new   = u - w S
//   o       = (exp(gc) * q) S + P v_new,   P[i,j] = (q_i.k_j) exp(gc_i - gc_j), j <= i
//   S       = exp(gc_last) S + (exp(gc_last - gc) * k)^T v_new
// Every exponent is <= 0 (g <= 0), so nothing overflows. vllm_gdn_cpu.reference has the same
// algorithm in torch (chunk_gated_delta_rule_chunked_ref).
#include <algorithm>
#include <type_traits>

#include "common/gemm.h"
#include "common/parallel.h"

namespace gdn {
namespace GDN_ISA {
namespace {

constexpr int64_t kChunk = 64;

struct ChunkScratch {
  float *q, *k, *kT, *v, *u, *w, *KK, *P, *Tm, *gc, *beta, *S;
  static size_t floats(int64_t K, int64_t V) {
    const int64_t C = kChunk;
    return 3 * C * K + C * K /*w*/ + 2 * C * V + 3 * C * C + 2 * C + K * V + 16 * 12;
  }
  ChunkScratch(float* base, int64_t K, int64_t V) {
    const int64_t C = kChunk;
    auto take = [&](int64_t n) {
      float* p = base;
      base += (n + 15) / 16 * 16;  // keep every buffer 64-byte aligned
      return p;
    };
    q = take(C * K), k = take(C * K), kT = take(K * C), w = take(C * K);
    v = take(C * V), u = take(C * V);
    KK = take(C * C), P = take(C * C), Tm = take(C * C);
    gc = take(C), beta = take(C), S = take(K * V);
  }
};

// Rows [bos, bos+n) of head `head` of a [T, H, D] tensor -> fp32 [n, D] (l2-normalised and scaled
// if asked).
template <class T>
void gather_rows(const Mat3& m, int64_t bos, int64_t n, int64_t head, int64_t D, float* dst, bool l2norm,
                 float mul) {
  const T* base = static_cast<const T*>(m.data) + head * m.head_stride;
  for (int64_t i = 0; i < n; ++i) {
    float* row = dst + i * D;
    load_row(base + (bos + i) * m.token_stride, row, D);
    if (l2norm) {
      l2normalize(row, D, mul);
    } else if (mul != 1.f) {
      for (int64_t d = 0; d < D; ++d) row[d] *= mul;
    }
  }
}

// Tm = (I + L)^-1 for strictly lower L (given in Tm's strictly lower part on entry, upper ignored).
void invert_unit_lower(float* Tm, int64_t n, int64_t ld) {
  for (int64_t i = 0; i < n; ++i) {
    float* row = Tm + i * ld;
    float lrow[kChunk];
    for (int64_t m = 0; m < i; ++m) lrow[m] = row[m];
    for (int64_t j = 0; j < n; ++j) row[j] = 0.f;
    for (int64_t m = 0; m < i; ++m) {
      const float l = -lrow[m];
      const float* tm = Tm + m * ld;
#pragma omp simd
      for (int64_t j = 0; j <= m; ++j) row[j] += l * tm[j];
    }
    row[i] = 1.f;
  }
}

template <class TIn, class TState>
void chunk_kernel(const ChunkParams& p) {
  const int64_t K = p.K, V = p.V, Hv = p.Hv, ratio = p.Hv / p.Hk, C = kChunk;

  parallel_for(p.N * Hv, 1, [&](int64_t begin, int64_t end) {
    ChunkScratch s(thread_scratch(ChunkScratch::floats(K, V)), K, V);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / Hv, h = task % Hv, hk = h / ratio;
      const int64_t bos = p.cu_seqlens[seq], eos = p.cu_seqlens[seq + 1];
      const int64_t slot = p.state_indices[seq];
      TIn* out = static_cast<TIn*>(p.out.data) + h * p.out.head_stride;

      if (slot < 0) {  // padding: zero output, touch no state
        for (int64_t t = bos; t < eos; ++t)
          for (int64_t j = 0; j < V; ++j) out[t * p.out.token_stride + j] = from_float<TIn>(0.f);
        continue;
      }
      TState* state = static_cast<TState*>(p.state.data) + slot * p.state.slot_stride + h * K * V;
      const bool has_init = p.has_initial_state == nullptr || p.has_initial_state[seq];
      if (has_init) {
        load_row(state, s.S, K * V);
      } else {
        for (int64_t i = 0; i < K * V; ++i) s.S[i] = 0.f;
      }

      for (int64_t c0 = bos; c0 < eos; c0 += C) {
        const int64_t n = std::min(C, eos - c0);
        gather_rows<TIn>(p.q, c0, n, hk, K, s.q, p.use_qk_l2norm, p.scale);
        gather_rows<TIn>(p.k, c0, n, hk, K, s.k, p.use_qk_l2norm, 1.f);
        gather_rows<TIn>(p.v, c0, n, h, V, s.v, false, 1.f);
        float acc = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          acc += p.g[(c0 + i) * p.g_stride + h];
          s.gc[i] = acc;
          s.beta[i] = p.beta[(c0 + i) * p.beta_stride + h];
        }
        const float g_last = s.gc[n - 1];

        transpose(s.k, n, K, K, s.kT, C);                       // kT [K, n]
        gemm_nn(n, n, K, s.k, K, s.kT, C, s.KK, C, false);      // KK = k k^T
        gemm_nn(n, n, K, s.q, K, s.kT, C, s.P, C, false);       // P = q k^T
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t j = 0; j <= i; ++j) {
            const float d = std::exp(s.gc[i] - s.gc[j]);
            s.P[i * C + j] *= d;
            s.Tm[i * C + j] = s.beta[i] * s.KK[i * C + j] * d;
          }
          for (int64_t j = i + 1; j < n; ++j) s.P[i * C + j] = 0.f;
        }
        invert_unit_lower(s.Tm, n, C);

        // u = Tm (beta v);  w = -Tm (beta exp(gc) k)  (negated so that u += w S gives v_new)
        for (int64_t i = 0; i < n; ++i) {
          const float bv = s.beta[i], bk = -s.beta[i] * std::exp(s.gc[i]);
          for (int64_t j = 0; j < V; ++j) s.v[i * V + j] *= bv;
          for (int64_t j = 0; j < K; ++j) s.w[i * K + j] = s.k[i * K + j] * bk;
        }
        gemm_nn(n, V, n, s.Tm, C, s.v, V, s.u, V, false);
        gemm_nn(n, K, n, s.Tm, C, s.w, K, s.k, K, false);        // s.k now holds w
        gemm_nn(n, V, K, s.k, K, s.S, V, s.u, V, true);          // u <- v_new = u - w S

        // o = (exp(gc) q) S + P v_new
        for (int64_t i = 0; i < n; ++i) {
          const float e = std::exp(s.gc[i]);
          for (int64_t j = 0; j < K; ++j) s.q[i * K + j] *= e;
        }
        gemm_nn(n, V, K, s.q, K, s.S, V, s.v, V, false);         // s.v now holds o
        gemm_nn(n, V, n, s.P, C, s.u, V, s.v, V, true);
        for (int64_t i = 0; i < n; ++i) store_row(s.v + i * V, out + (c0 + i) * p.out.token_stride, V);

        // S = exp(g_last) S + (exp(g_last - gc) k)^T v_new
        const float e_last = std::exp(g_last);
        for (int64_t i = 0; i < K * V; ++i) s.S[i] *= e_last;
        for (int64_t i = 0; i < n; ++i) {
          const float e = std::exp(g_last - s.gc[i]);
          for (int64_t r = 0; r < K; ++r) s.kT[r * C + i] *= e;
        }
        gemm_nn(K, V, n, s.kT, C, s.u, V, s.S, V, true);
      }
      store_row(s.S, state, K * V);
    }
  });
}

}  // namespace

void chunk_gated_delta_rule(const ChunkParams& p) {
  dispatch_dtype(p.q.dtype, [&](auto in_tag) {
    dispatch_dtype(p.state.dtype, [&](auto state_tag) {
      chunk_kernel<decltype(in_tag), decltype(state_tag)>(p);
    });
  });
}

}  // namespace GDN_ISA
}  // namespace gdn
