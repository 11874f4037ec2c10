// mamba1_state_update: decode, one token per sequence. Memory-bound: each sequence's [Dm, N]
// state is read and written once, channel row by channel row (a row is N contiguous values, one
// AVX-512 vector for N = 16), converted to fp32 in registers:
//   h[d, :] = exp(dt_d A[d, :]) h[d, :] + (dt_d x_d) B      y_d = h[d, :] . C + D x_d   (* silu(z_d))
// with dt_d = softplus(dt_d + bias_d) computed for the task's channels at once (vectorised over
// channels). One task = (sequence, block of channels): enough tasks for every thread at batch 1.
// N = 16 with AVX-512: 16 channels at a time, their y summed in registers and finished at once; the
// rows of A (as large as an fp32 state, cold in a model at batch 1) prefetched beside the state's.
#include <algorithm>

#include "common/gemm.h"
#include "common/parallel.h"
#include "mamba1/common.h"

namespace gdn {
namespace GDN_ISA {
namespace {

// State requested ahead of the row being streamed, for writing, into L2 (as the Mamba2 / GDN
// decode); the A rows as many rows ahead, for reading.
constexpr int64_t kPrefetchBytes = 8192;

// One state row of Ns values (whole vectors, then a part vector: the missing lanes of A, B, C are
// zero, so their h stays zero and adds nothing). Returns h_new . C as a vector of partial sums.
template <class TS>
inline vfloat update_row(TS* row, const float* A, const float* B, const float* C, int64_t Ns, float dt, float dtx) {
  const vfloat dv = vbroadcast(dt), xv = vbroadcast(dtx);
  vfloat acc{};
  int64_t i = 0;
  for (; i + kVecWidth <= Ns; i += kVecWidth) {
    const vfloat h = mamba1::vexp2_decay(dv * vload(A + i)) * vload_float(row + i) + xv * vload(B + i);
    vstore_float(row + i, h);
    acc += h * vload(C + i);
  }
  if (i < Ns) {
    const int64_t n = Ns - i;
    const vfloat h = mamba1::vexp2_decay(dv * mamba1::load_part(A + i, n)) * mamba1::load_part(row + i, n) + xv * vload(B + i);
    mamba1::store_part(row + i, h, n);
    acc += h * vload(C + i);
  }
  return acc;
}

// y[r] = sum of the kVecWidth partial sums of row r (yv [n, kVecWidth]); with AVX-512, 16 rows at
// a time as a 16 x 16 transpose and 15 vector adds (as the Mamba2 decode).
inline void row_sums(const float* yv, int64_t n, float* y) {
  int64_t r = 0;
#if defined(__AVX512F__)
  alignas(64) float t[16 * 16];
  for (; r + 16 <= n; r += 16) {
    transpose_16x16(yv + r * 16, 16, t, 16);
    vfloat sum = vload(t);
    for (int j = 1; j < 16; ++j) sum += vload(t + j * 16);
    vstore(y + r, sum);
  }
#endif
  for (; r < n; ++r) {
    float sum = 0.f;
    for (int j = 0; j < kVecWidth; ++j) sum += yv[r * kVecWidth + j];
    y[r] = sum;
  }
}

#if defined(__AVX512F__)
// The 16 horizontal sums of v[0..15] as one vector (lane j = sum of v[j]): a tree of 30 shuffles
// and 15 adds in registers (pairs of rows, then quads, then 128-bit lanes), no memory round trip.
inline vfloat row_sums16(const __m512* v) {
  __m512 t[8], u[4], w[2];
  for (int k = 0; k < 8; ++k)  // [a0+a2, b0+b2, a1+a3, b1+b3] per 128-bit lane, rows 2k, 2k+1
    t[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // rows 4k..4k+3, one partial sum each per 128-bit lane
    const __m512d c = _mm512_castps_pd(t[2 * k]), d = _mm512_castps_pd(t[2 * k + 1]);
    u[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  for (int k = 0; k < 2; ++k)  // lanes 0-1: rows 8k..8k+3, lanes 2-3: rows 8k+4..8k+7
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], 0x88), _mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], 0xdd));
  const __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
  return reinterpret_cast<const vfloat&>(s);
}
#endif

template <class TIn, class TS>
void update_kernel(const Mamba1Params& p) {
  constexpr int64_t W = kVecWidth;
  const int64_t Dm = p.Dm, Ns = p.Nst, Npad = (Ns + W - 1) / W * W;
  // Channel blocks: all of Dm unless that leaves threads without a few tasks each (whole vectors).
  const int64_t want = 4 * static_cast<int64_t>(num_threads());
  int64_t cb = Dm;
  while (p.N * ((Dm + cb - 1) / cb) < want && cb > 4 * W) cb = ((cb + 1) / 2 + W - 1) / W * W;
  const int64_t blocks = (Dm + cb - 1) / cb, cpad = (cb + W - 1) / W * W;
  const int64_t row_bytes = Ns * static_cast<int64_t>(sizeof(TS));
  const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / row_bytes);  // rows prefetched ahead

  parallel_for(p.N * blocks, 1, [&](int64_t begin, int64_t end) {
    float* buf = thread_scratch(2 * Npad + 4 * cpad + cpad * W + 64);
    float *Bf = buf, *Cf = Bf + Npad, *dl = Cf + Npad, *ux = dl + cpad, *xf = ux + cpad, *y = xf + cpad;
    float* yv = y + cpad;
    int64_t loaded_seq = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / blocks, blk = task % blocks;
      const int64_t d0 = blk * cb, d1 = std::min(Dm, d0 + cb), n = d1 - d0;
      TIn* out = mamba1::row<TIn>(p.out, seq);
      const int64_t slot = p.state_indices[seq];
      if (slot < 0) {  // padding: zero output, no state touched
        std::fill_n(out + d0, n, from_float<TIn>(0.f));
        continue;
      }
      if (seq != loaded_seq) {
        std::fill_n(Bf, 2 * Npad, 0.f);
        mamba1::load_any(mamba1::any_row(p.B, seq), p.B.dtype, Bf, Ns);
        mamba1::load_any(mamba1::any_row(p.C, seq), p.C.dtype, Cf, Ns);
        loaded_seq = seq;
      }
      const TIn* x = mamba1::row<const TIn>(p.x, seq);
      const void* dtr = mamba1::any_row(p.dt, seq);
      for (int64_t c = d0; c < d1; c += W) {
        const int64_t nd = std::min(W, d1 - c);
        const vfloat d = mamba1::step_sizes(p, dtr, c, nd), xv = mamba1::load_part(x + c, nd);
        vstore(dl + (c - d0), d * mamba1::kLog2e);  // the rows take 2^(dt log2(e) A)
        vstore(ux + (c - d0), d * xv);
        vstore(xf + (c - d0), xv);
      }
      TS* S = static_cast<TS*>(p.state.data) + slot * p.state.slot_stride + d0 * Ns;
      const float* A = p.A + d0 * Ns;
      const TIn* z = p.z.data ? mamba1::row<const TIn>(p.z, seq) : nullptr;
#if defined(__AVX512F__)
      if (Ns == W) {  // N = 16: a row is one vector; 16 rows (channels) at a time, y in registers
        const vfloat Bv = vload(Bf), Cv = vload(Cf);
        // One row: the state row and the A row `ahead` rows on are prefetched (A is as large as a
        // fp32 state and as cold in a model at batch 1; past the block they are the next task's).
        const TS* const pS = S + ahead * W;  // local copies: nothing reloaded per row past the stores
        const float* const pA = A + ahead * W;
        const auto update = [&](int64_t r) {
          __builtin_prefetch(pS + r * W, 1, 2);
          __builtin_prefetch(pA + r * W, 0, 2);
          const vfloat h = mamba1::vexp2_decay(dl[r] * vload(A + r * W)) * vload_float(S + r * W) + ux[r] * Bv;
          vstore_float(S + r * W, h);
          const vfloat hc = h * Cv;
          return reinterpret_cast<const __m512&>(hc);
        };
        for (int64_t r0 = 0; r0 < n; r0 += W) {
          const int64_t m = std::min(W, n - r0);
          __m512 v[16];
          if (m == W) {
#pragma GCC unroll 16
            for (int64_t j = 0; j < W; ++j) v[j] = update(r0 + j);
          } else {
            for (int64_t j = 0; j < W; ++j) v[j] = j < m ? update(r0 + j) : _mm512_setzero_ps();
          }
          const vfloat yr = row_sums16(v);
          mamba1::store_part(out + d0 + r0, mamba1::finish(yr, vload(xf + r0), p, z, d0 + r0, m), m);
        }
        continue;
      }
#endif
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(S + (r + ahead) * Ns) + b, 1, 2);
        for (int64_t b = 0; b < Ns * 4; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(A + (r + ahead) * Ns) + b, 0, 2);
        vstore(yv + r * W, update_row(S + r * Ns, A + r * Ns, Bf, Cf, Ns, dl[r], ux[r]));
      }
      row_sums(yv, n, y);
      for (int64_t c = d0; c < d1; c += W) {
        const int64_t nd = std::min(W, d1 - c);
        mamba1::store_part(out + c, mamba1::finish(vload(y + (c - d0)), vload(xf + (c - d0)), p, z, c, nd), nd);
      }
    }
  });
}

}  // namespace

void mamba1_state_update(const Mamba1Params& p) {
  dispatch_dtype(p.x.dtype, [&](auto in_tag) {
    dispatch_dtype(p.state.dtype, [&](auto state_tag) {
      update_kernel<decltype(in_tag), decltype(state_tag)>(p);
    });
  });
}

}  // namespace GDN_ISA
}  // namespace gdn
