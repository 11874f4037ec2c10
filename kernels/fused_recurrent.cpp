// fused_recurrent_gated_delta_rule: decode. Each task owns one (sequence, value head, V-block) and
// runs that sequence's tokens through the recurrence. Columns of the state are independent in
// every step (S^T k, S^T q and the rank-1 update all act column-wise), so splitting V keeps all
// cores busy at small batch. Per token the state block is read once for both dot products and
// once more (from cache) for the fused decay + update:
//   a = S^T k, b = S^T q,  v_new = beta * (v - decay * a),  o = decay * b + (k.q) * v_new,
//   S = decay * S + k (x) v_new        (q pre-scaled, so o equals scale * S_new^T q)
#include <algorithm>
#include <type_traits>

#include "common/gating.h"
#include "common/parallel.h"

namespace gdn {
namespace GDN_ISA {
namespace {

// Largest V-block (a multiple of the vector width, at least 32 wide) that still gives every thread
// a few tasks.
int64_t choose_v_block(int64_t tasks_per_block, int64_t V) {
  const int64_t want = 4 * static_cast<int64_t>(num_threads());
  int64_t vb = V;
  while (vb % 2 == 0 && vb / 2 >= 32 && (vb / 2) % kVecWidth == 0 && tasks_per_block * (V / vb) < want) vb /= 2;
  return vb;
}

template <class TIn, class TState>
void recurrent_kernel(const RecurrentParams& p) {
  const int64_t K = p.K, V = p.V, Hv = p.Hv, ratio = p.Hv / p.Hk;
  const int64_t vb = choose_v_block(p.N * Hv, V);
  const int64_t n_vblocks = V / vb;
  constexpr bool kStateIsFloat = std::is_same<TState, float>::value;

  parallel_for(p.N * Hv * n_vblocks, 1, [&](int64_t begin, int64_t end) {
    float* scratch = thread_scratch(2 * K + 3 * vb + (kStateIsFloat ? 0 : K * vb));
    float* qf = scratch;
    float* kf = qf + K;
    float* acc_k = kf + K;
    float* acc_q = acc_k + vb;
    float* v_new = acc_q + vb;
    float* local = v_new + vb;

    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / (Hv * n_vblocks);
      const int64_t h = (task / n_vblocks) % Hv;
      const int64_t v0 = (task % n_vblocks) * vb;
      const int64_t bos = p.cu_seqlens ? p.cu_seqlens[seq] : seq;
      const int64_t eos = p.cu_seqlens ? p.cu_seqlens[seq + 1] : seq + 1;
      const int64_t slot = p.state_indices[seq];
      TIn* out_base = static_cast<TIn*>(p.out.data) + h * p.out.head_stride + v0;

      if (slot < 0) {  // padding: zero output, touch no state
        for (int64_t t = bos; t < eos; ++t) {
          TIn* o = out_base + t * p.out.token_stride;
          for (int64_t j = 0; j < vb; ++j) o[j] = from_float<TIn>(0.f);
        }
        continue;
      }

      TState* S = static_cast<TState*>(p.state.data) + slot * p.state.slot_stride + h * K * V + v0;
      // fp32 states are updated in place; narrower ones through an fp32 copy of the block.
      float* Sb;
      int64_t ld;
      if constexpr (kStateIsFloat) {
        Sb = S;
        ld = V;
      } else {
        Sb = local;
        ld = vb;
        for (int64_t r = 0; r < K; ++r) load_row(S + r * V, Sb + r * vb, vb);
      }

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
        float g, beta;
        gate_values(p.gate, t, h, &g, &beta);
        const float decay = std::exp(g);
        const float kq = dot(kf, qf, K);

        for (int64_t j = 0; j < vb; ++j) acc_k[j] = acc_q[j] = 0.f;
        for (int64_t r = 0; r < K; ++r) {
          const float* __restrict row = Sb + r * ld;
          const float kr = kf[r], qr = qf[r];
#pragma omp simd
          for (int64_t j = 0; j < vb; ++j) {
            acc_k[j] += kr * row[j];
            acc_q[j] += qr * row[j];
          }
        }
        const TIn* vt = static_cast<const TIn*>(p.v.data) + t * p.v.token_stride + h * p.v.head_stride + v0;
        TIn* o = out_base + t * p.out.token_stride;
        for (int64_t j = 0; j < vb; ++j) {
          v_new[j] = beta * (to_float(vt[j]) - decay * acc_k[j]);
          o[j] = from_float<TIn>(decay * acc_q[j] + kq * v_new[j]);
        }
        for (int64_t r = 0; r < K; ++r) {
          float* __restrict row = Sb + r * ld;
          const float kr = kf[r];
#pragma omp simd
          for (int64_t j = 0; j < vb; ++j) row[j] = decay * row[j] + kr * v_new[j];
        }
      }

      if constexpr (!kStateIsFloat)
        for (int64_t r = 0; r < K; ++r) store_row(Sb + r * vb, S + r * V, vb);
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
