// mamba1_selective_scan: Mamba-1 prefill over a varlen batch. The scan over time is sequential per
// channel, so the work splits over (sequence, block of channels): one task = up to kMaxBlocks
// blocks of kVecWidth channels of one sequence, walked through its tokens in chunks of up to
// kChunk. Per chunk the task converts the B / C rows once (shared by its blocks), the step sizes
// softplus(dt + bias), dt x and x of its channels (vectorised over channels), then runs each block's
// recurrence with the block's state [N, kVecWidth] in vectors (lane = channel, one vector per state
// index n):
//   h[n] = exp(dt A[:, n]) h[n] + (dt x) B_t[n]          (exp per (channel, n, token): the cost)
//   y    = sum_n h[n] C_t[n]                              then (y + D x) * silu(z)
// Token-major inputs make this natural: x[t, d:d+16] is one contiguous load. The state is read
// (transposed into lanes) once per sequence and written back once, plus at the checkpoint offset,
// where a chunk ends. Every channel's arithmetic is the same whatever the task grouping, so results
// do not depend on the thread count.
#include <algorithm>

#include "common/parallel.h"
#include "mamba1/common.h"

namespace gdn {
namespace GDN_ISA {
namespace {

constexpr int64_t kChunk = 64;      // tokens per chunk
constexpr int64_t kMaxBlocks = 16;  // channel blocks per task
constexpr int64_t kRowsAhead = 8;   // token rows prefetched this far ahead

// The recurrence of one block over n tokens. dl / ux: [n, W] step sizes times log2(e) and dt x (y overwrites
// ux), Bf / Cf [n, Ns], h and At [Ns, W]. kN > 0: Ns known at compile time (the state in registers).
template <int kN>
inline void scan_block(int64_t n, int64_t Ns_rt, const float* dl, float* ux, const float* Bf, const float* Cf,
                       float* h, const float* At) {
  constexpr int64_t W = kVecWidth;
  const int64_t Ns = kN > 0 ? kN : Ns_rt;
  if constexpr (kN > 0) {
    vfloat hv[kN];
#pragma GCC unroll 16
    for (int k = 0; k < kN; ++k) hv[k] = vload(h + k * W);
    for (int64_t i = 0; i < n; ++i) {
      const vfloat d = vload(dl + i * W), u = vload(ux + i * W);
      const float *b = Bf + i * kN, *c = Cf + i * kN;
      vfloat acc0{}, acc1{};
#pragma GCC unroll 16
      for (int k = 0; k < kN; k += 2) {
        hv[k] = mamba1::vexp2_decay(d * vload(At + k * W)) * hv[k] + u * b[k];
        acc0 += hv[k] * c[k];
        if (k + 1 < kN) {
          hv[k + 1] = mamba1::vexp2_decay(d * vload(At + (k + 1) * W)) * hv[k + 1] + u * b[k + 1];
          acc1 += hv[k + 1] * c[k + 1];
        }
      }
      vstore(ux + i * W, acc0 + acc1);
    }
#pragma GCC unroll 16
    for (int k = 0; k < kN; ++k) vstore(h + k * W, hv[k]);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const vfloat d = vload(dl + i * W), u = vload(ux + i * W);
      const float *b = Bf + i * Ns, *c = Cf + i * Ns;
      vfloat acc0{}, acc1{};
      int64_t k = 0;
      for (; k + 2 <= Ns; k += 2) {
        const vfloat h0 = mamba1::vexp2_decay(d * vload(At + k * W)) * vload(h + k * W) + u * b[k];
        const vfloat h1 = mamba1::vexp2_decay(d * vload(At + (k + 1) * W)) * vload(h + (k + 1) * W) + u * b[k + 1];
        vstore(h + k * W, h0);
        vstore(h + (k + 1) * W, h1);
        acc0 += h0 * c[k];
        acc1 += h1 * c[k + 1];
      }
      if (k < Ns) {
        const vfloat h0 = mamba1::vexp2_decay(d * vload(At + k * W)) * vload(h + k * W) + u * b[k];
        vstore(h + k * W, h0);
        acc0 += h0 * c[k];
      }
      vstore(ux + i * W, acc0 + acc1);
    }
  }
}

// State slot rows of channels [d0, d0 + nd) <-> h [Ns, W] (lane j = channel d0 + j).
template <class TS>
void load_state(const TS* S, int64_t d0, int64_t nd, int64_t Ns, float* h) {
  std::fill_n(h, Ns * kVecWidth, 0.f);
  for (int64_t j = 0; j < nd; ++j)
    for (int64_t k = 0; k < Ns; ++k) h[k * kVecWidth + j] = to_float(S[(d0 + j) * Ns + k]);
}
template <class TS>
void store_state(TS* S, int64_t d0, int64_t nd, int64_t Ns, const float* h) {
  for (int64_t j = 0; j < nd; ++j)
    for (int64_t k = 0; k < Ns; ++k) S[(d0 + j) * Ns + k] = from_float<TS>(h[k * kVecWidth + j]);
}

template <class TIn, class TS>
void scan_kernel(const Mamba1Params& p) {
  constexpr int64_t W = kVecWidth;
  const int64_t Dm = p.Dm, Ns = p.Nst, nblk = (Dm + W - 1) / W;
  // Blocks per task: kMaxBlocks unless that leaves threads without a few tasks each.
  const int64_t want = 4 * static_cast<int64_t>(num_threads());
  int64_t bpt = std::min(kMaxBlocks, nblk);
  while (bpt > 1 && p.N * ((nblk + bpt - 1) / bpt) < want) --bpt;
  const int64_t groups = (nblk + bpt - 1) / bpt;
  const size_t scratch = static_cast<size_t>(2 * bpt * Ns * W + 2 * kChunk * Ns + 3 * bpt * kChunk * W + 64);

  parallel_for(p.N * groups, 1, [&](int64_t begin, int64_t end) {
    float* buf = thread_scratch(scratch);
    float *h = buf, *At = h + bpt * Ns * W, *Bf = At + bpt * Ns * W, *Cf = Bf + kChunk * Ns;
    float *dl = Cf + kChunk * Ns, *ux = dl + bpt * kChunk * W, *xb = ux + bpt * kChunk * W;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / groups, g = task % groups;
      const int64_t c0 = g * bpt * W, c1 = std::min(Dm, c0 + bpt * W), nb = (c1 - c0 + W - 1) / W;
      const int64_t s = p.cu_seqlens[seq], e = p.cu_seqlens[seq + 1];
      const int64_t slot = p.state_indices[seq];
      if (slot < 0) {  // padding: zero output, no state touched
        for (int64_t t = s; t < e; ++t) std::fill_n(mamba1::row<TIn>(p.out, t) + c0, c1 - c0, from_float<TIn>(0.f));
        continue;
      }
      TS* state = static_cast<TS*>(p.state.data);
      const bool init = !p.has_initial_state || p.has_initial_state[seq];
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t d0 = c0 + b * W, nd = std::min(W, c1 - d0);
        float *hb = h + b * Ns * W, *Ab = At + b * Ns * W;
        if (init) {
          load_state(state + slot * p.state.slot_stride, d0, nd, Ns, hb);
        } else {
          std::fill_n(hb, Ns * W, 0.f);
        }
        std::fill_n(Ab, Ns * W, 0.f);
        for (int64_t j = 0; j < nd; ++j)
          for (int64_t k = 0; k < Ns; ++k) Ab[k * W + j] = p.A[(d0 + j) * Ns + k];
      }
      const int64_t ck = p.checkpoint_offsets ? p.checkpoint_offsets[seq] : 0;  // 0: none
      for (int64_t pos = s; pos < e;) {
        int64_t stop = std::min(e, pos + kChunk);
        if (ck > 0 && s + ck > pos && s + ck < stop) stop = s + ck;
        const int64_t n = stop - pos;
        for (int64_t i = 0; i < n; ++i) {
          mamba1::load_any(mamba1::any_row(p.B, pos + i), p.B.dtype, Bf + i * Ns, Ns);
          mamba1::load_any(mamba1::any_row(p.C, pos + i), p.C.dtype, Cf + i * Ns, Ns);
        }
        const int64_t dt_size = mamba1::dtype_size(p.dt.dtype), dt_row_bytes = p.dt.row_stride * dt_size;
        const int64_t x_bytes = (c1 - c0) * static_cast<int64_t>(sizeof(TIn));
        for (int64_t i = 0; i < n; ++i) {
          const int64_t t = pos + i;
          const TIn* x = mamba1::row<const TIn>(p.x, t);
          const char* dtr = static_cast<const char*>(mamba1::any_row(p.dt, t));
          if (i + kRowsAhead < n) {  // the task's part of the rows kRowsAhead tokens on (one page each)
            prefetch_rows<3>(mamba1::row<const TIn>(p.x, t + kRowsAhead) + c0, 0, 1, x_bytes);
            prefetch_rows<3>(dtr + kRowsAhead * dt_row_bytes + c0 * dt_size, 0, 1, (c1 - c0) * dt_size);
            if (p.z.data) prefetch_rows<3>(mamba1::row<const TIn>(p.z, t + kRowsAhead) + c0, 0, 1, x_bytes);
          }
          for (int64_t b = 0; b < nb; ++b) {
            const int64_t d0 = c0 + b * W, nd = std::min(W, c1 - d0), o = (b * kChunk + i) * W;
            const vfloat d = mamba1::step_sizes(p, dtr, d0, nd), xv = mamba1::load_part(x + d0, nd);
            vstore(dl + o, d * mamba1::kLog2e);  // the recurrence takes 2^(dt log2(e) A)
            vstore(ux + o, d * xv);
            vstore(xb + o, xv);
          }
        }
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t o = b * kChunk * W;
          if (Ns == 16) {
            scan_block<16>(n, Ns, dl + o, ux + o, Bf, Cf, h + b * Ns * W, At + b * Ns * W);
          } else {
            scan_block<0>(n, Ns, dl + o, ux + o, Bf, Cf, h + b * Ns * W, At + b * Ns * W);
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          const int64_t t = pos + i;
          const TIn* z = p.z.data ? mamba1::row<const TIn>(p.z, t) : nullptr;
          TIn* out = mamba1::row<TIn>(p.out, t);
          for (int64_t b = 0; b < nb; ++b) {
            const int64_t d0 = c0 + b * W, nd = std::min(W, c1 - d0), o = (b * kChunk + i) * W;
            mamba1::store_part(out + d0, mamba1::finish(vload(ux + o), vload(xb + o), p, z, d0, nd), nd);
          }
        }
        pos = stop;
        if (ck > 0 && pos == s + ck) {
          TS* S = state + p.checkpoint_slots[seq] * p.state.slot_stride;
          for (int64_t b = 0; b < nb; ++b) {
            const int64_t d0 = c0 + b * W;
            store_state(S, d0, std::min(W, c1 - d0), Ns, h + b * Ns * W);
          }
        }
      }
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t d0 = c0 + b * W;
        store_state(state + slot * p.state.slot_stride, d0, std::min(W, c1 - d0), Ns, h + b * Ns * W);
      }
    }
  });
}

}  // namespace

void mamba1_selective_scan(const Mamba1Params& p) {
  dispatch_dtype(p.x.dtype, [&](auto in_tag) {
    dispatch_dtype(p.state.dtype, [&](auto state_tag) {
      scan_kernel<decltype(in_tag), decltype(state_tag)>(p);
    });
  });
}

}  // namespace GDN_ISA
}  // namespace gdn
