// mamba2_state_update: decode, one token per sequence. Memory-bound: each (sequence, head) reads
// and writes its [P, N] state once, row by row:
//   h[p, :] = exp(A dt) h[p, :] + (dt x[p]) B      (fp32 math, state dtype in memory)
//   y[p]    = h[p, :] . C + D x[p]                 (then * silu(z[p]))
// One task = (sequence, head, block of P rows): enough tasks for every thread at batch 1.
#include <algorithm>

#include "common/gemm.h"
#include "common/parallel.h"
#include "mamba2/common.h"

namespace gdn {
namespace GDN_ISA {
namespace {

// Software prefetch ahead of the row being streamed (rows of one head are contiguous; 8 KiB
// ahead into L2 as in the GDN decode kernel).
constexpr int64_t kPrefetchBytes = 8192;

// One state row of n values (whole vectors, then the rest scalar). Returns h_new . C as a vector
// of partial sums (the tail's in lane 0): the caller reduces the rows' vectors after the rows, so
// no row waits for its own reduction.
// `ahead` is the row kPrefetchBytes ahead: its lines are requested (for writing, into L2) as this
// row's are consumed, one per line, as stream_scale does, rather than in one burst per row.
template <class TS>
inline vfloat update_row(TS* row, const TS* ahead, const float* B, const float* C, int64_t n, float decay,
                         float dtx) {
  const vfloat dv = vbroadcast(decay), xv = vbroadcast(dtx);
  vfloat acc0{}, acc1{};
  int64_t i = 0;
  constexpr int64_t kPerLine = 64 / sizeof(TS);
  for (; i + 2 * kVecWidth <= n; i += 2 * kVecWidth) {
    for (int64_t b = 0; b < 2 * kVecWidth; b += kPerLine) __builtin_prefetch(ahead + i + b, 1, 2);
    const vfloat h0 = dv * vload_float(row + i) + xv * vload(B + i);
    const vfloat h1 = dv * vload_float(row + i + kVecWidth) + xv * vload(B + i + kVecWidth);
    vstore_float(row + i, h0);
    vstore_float(row + i + kVecWidth, h1);
    acc0 += h0 * vload(C + i);
    acc1 += h1 * vload(C + i + kVecWidth);
  }
  for (; i + kVecWidth <= n; i += kVecWidth) {
    __builtin_prefetch(ahead + i, 1, 2);
    const vfloat h0 = dv * vload_float(row + i) + xv * vload(B + i);
    vstore_float(row + i, h0);
    acc0 += h0 * vload(C + i);
  }
  float s = 0.f;
  for (; i < n; ++i) {
    const float h = decay * to_float(row[i]) + dtx * B[i];
    row[i] = from_float<TS>(h);
    s += h * C[i];
  }
  acc0[0] += s;
  return acc0 + acc1;
}

// Requests the lines of [p, p + bytes) for writing into L2 (prefetches never fault).
inline void prefetch_lines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 1, 2);
}

// y[r] = sum of the kVecWidth partial sums of row r (yv [n, kVecWidth]); with AVX-512, 16 rows at
// a time as a 16 x 16 transpose and 15 vector adds instead of 16 serial scalar adds per row.
inline void row_sums(float* yv, int64_t n, float* y) {
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

template <class TIn, class TS>
void state_update_kernel(const Mamba2Params& p) {
  const int64_t H = p.H, P = p.P, N = p.Nst, heads_per_group = p.H / p.G;
  // P-blocks: all of P unless that leaves threads without a few tasks each.
  const int64_t want = 4 * static_cast<int64_t>(num_threads());
  int64_t pb = P;
  while (p.N * H * ((P + pb - 1) / pb) < want && pb > 8) pb = (pb + 1) / 2;
  const int64_t blocks = (P + pb - 1) / pb;
  const int64_t row_bytes = N * static_cast<int64_t>(sizeof(TS));
  const int64_t prefetch_rows = std::max<int64_t>(1, kPrefetchBytes / row_bytes);

  parallel_for(p.N * H * blocks, 1, [&](int64_t begin, int64_t end) {
    float* buf = thread_scratch(2 * N + 2 * P + P * kVecWidth + 64);
    float *Bf = buf, *Cf = buf + N, *y = buf + 2 * N;
    float* xf = y + P;
    float* yv = xf + P;  // per row, its vector of partial sums of h . C
    int64_t loaded_seq = -1, loaded_group = -1;  // whose B and C rows Bf, Cf hold
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / (H * blocks), h = task / blocks % H, blk = task % blocks;
      const int64_t p0 = blk * pb, p1 = std::min(P, p0 + pb), n = p1 - p0;
      TIn* out = p.out.row<TIn>(seq, h) + p0;
      const int64_t slot = p.state_indices[seq];
      if (slot < 0) {  // padding: zero output, no state touched
        std::fill_n(out, n, from_float<TIn>(0.f));
        continue;
      }
      const int64_t g = h / heads_per_group;
      if (seq != loaded_seq || g != loaded_group) {  // consecutive tasks share them mostly
        load_row(p.B.row<const TIn>(seq, g), Bf, N);
        load_row(p.C.row<const TIn>(seq, g), Cf, N);
        loaded_seq = seq, loaded_group = g;
      }
      const TIn* x = p.x.row<const TIn>(seq, h) + p0;
      load_row(x, xf, n);
      const float dt = mamba2::step_size(p, mamba2::raw_dt(p, seq, h), h);
      const float decay = std::exp(p.A[h] * dt);  // A <= 0, dt >= 0: exponent <= 0
      TS* S = static_cast<TS*>(p.state.data) + slot * p.state.slot_stride + (h * P + p0) * N;
      // Every line of the row kPrefetchBytes ahead, for writing, into L2 (as stream_scale). Past the
      // block that is the next block or head of the same slot: the thread's next task, usually.
      if (task == begin) prefetch_lines(S, prefetch_rows * row_bytes);
      for (int64_t r = 0; r < n; ++r) {
        vstore(yv + r * kVecWidth, update_row(S + r * N, S + (r + prefetch_rows) * N, Bf, Cf, N, decay, dt * xf[r]));
      }
      row_sums(yv, n, y);
      const TIn* z = p.z.data ? p.z.row<const TIn>(seq, h) + p0 : nullptr;
      mamba2::finish_row(y, x, z, p.D ? p.D[h] : 0.f, p.D != nullptr, n);
      store_row(y, out, n);
    }
  });
}

}  // namespace

void mamba2_state_update(const Mamba2Params& p) {
  dispatch_dtype(p.x.dtype, [&](auto in_tag) {
    dispatch_dtype(p.state.dtype, [&](auto state_tag) {
      state_update_kernel<decltype(in_tag), decltype(state_tag)>(p);
    });
  });
}

}  // namespace GDN_ISA
}  // namespace gdn
