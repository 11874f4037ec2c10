// mamba2_chunk_scan: prefill with the chunked SSD form of Mamba2 (as mamba_ssm's ssd_minimal). One
// task = (sequence, block of heads of one group); it walks its chunks of up to L tokens in order,
// carrying each head's fp32 state, kept transposed as St [N, P] so that every product below is a
// plain row-major GEMM. Per chunk (a = A dt <= 0, Acs = cumsum(a) within the chunk):
//   CB      = C B^T                                       once per (group, chunk), shared by heads
//   M[i,j]  = CB[i,j] exp(Acs_i - Acs_j)                 j <= i   (exponent <= 0)
//   Y       = exp(Acs_i) * (C St)  +  M (dt * x)
//   St      = exp(Acs_end) St + B^T (exp(Acs_end - Acs_j) dt_j x_j)   (exponents <= 0)
//   y       = (Y + D x) * silu(z)
// No exponent is ever positive, so nothing overflows at any decay. A chunk also ends at a
// sequence's checkpoint offset, where that state is written to its checkpoint slot.
// vllm_gdn_cpu.reference.mamba2_chunked_ref is the same algorithm in torch.
//
// The products run through Mm (common/gemm_engine.h): fp32, or for bf16 inputs on a GEMM path
// with bf16 products, bf16-rounded operands with fp32 accumulation.
#include <algorithm>

#include "common/gemm_engine.h"
#include "common/parallel.h"
#include "mamba2/common.h"

namespace gdn {
namespace GDN_ISA {
namespace {

constexpr int64_t kChunk = 64;
constexpr int64_t kRowsAhead = 8;  // rows a token apart are prefetched this far ahead (as GDN's)

struct Scratch {
  float *Cc, *Bc, *Bt, *CB, *M, *X, *Xdt, *Y, *tmp, *St, *dt, *Acs, *eAcs, *wend;
  uint16_t* a_bf16;
  uint32_t *pack_Bt, *pack_St, *pack_X, *pack_Xw;

  size_t carve(float* base, int64_t N, int64_t P, int64_t heads) {
    const int64_t L = kChunk;
    size_t used = 0;
    auto take = [&](int64_t n) {
      float* r = base ? base + used : nullptr;
      used += static_cast<size_t>((n + 15) / 16 * 16);
      return r;
    };
    Cc = take(L * N), Bc = take(L * N), Bt = take(N * L), CB = take(L * L), M = take(L * L);
    X = take(L * P), Xdt = take(L * P), Y = take(L * P), tmp = take(P * N), St = take(heads * N * P);
    dt = take(L), Acs = take(L), eAcs = take(L), wend = take(L);
    a_bf16 = reinterpret_cast<uint16_t*>(take(std::max({L * even(N), N * even(L), L * L}) / 2 + 1));
    pack_Bt = reinterpret_cast<uint32_t*>(take(even(N) / 2 * L));
    pack_St = reinterpret_cast<uint32_t*>(take(even(N) / 2 * P));
    pack_X = reinterpret_cast<uint32_t*>(take(L / 2 * P));
    pack_Xw = reinterpret_cast<uint32_t*>(take(L / 2 * P));
    return used;
  }
};

// Rows [t0, t0 + n) of head `head` of a [T, H, D] tensor -> fp32 [n, D].
template <class T>
void gather_rows(const Mat3& m, int64_t t0, int64_t n, int64_t head, int64_t D, float* dst) {
  const int64_t bytes = D * static_cast<int64_t>(sizeof(T));
  prefetch_rows<3>(m.row<const T>(t0, head), m.token_stride, std::min(n, kRowsAhead), bytes);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kRowsAhead < n) prefetch_rows<3>(m.row<const T>(t0 + i + kRowsAhead, head), m.token_stride, 1, bytes);
    load_row(m.row<const T>(t0 + i, head), dst + i * D, D);
  }
}

// State slot rows [P, N] (TS) <-> transposed fp32 St [N, P].
template <class TS>
void load_state(const TS* src, int64_t P, int64_t N, float* tmp, float* St) {
  load_row(src, tmp, P * N);
  transpose(tmp, P, N, N, St, P);
}
template <class TS>
void store_state(const float* St, int64_t P, int64_t N, float* tmp, TS* dst) {
  transpose(St, N, P, P, tmp, N);
  store_row(tmp, dst, P * N);
}

// One chunk [c0, c0 + n) of head h, given the group's C (Cc), B^T (Bt, packed in Bt_op) and CB.
template <class TIn>
void head_chunk(const Mamba2Params& p, const Mm& mm, Scratch& s, int64_t h, int64_t c0, int64_t n, float* St) {
  const int64_t N = p.Nst, P = p.P, L = kChunk;
  const float A = p.A[h];
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float d = mamba2::step_size(p, mamba2::raw_dt(p, c0 + i, h), h);
    s.dt[i] = d;
    acc += A * d;  // <= 0
    s.Acs[i] = acc;
  }
  const float a_end = s.Acs[n - 1];
  exp_affine(s.Acs, n, 1.f, 0.f, s.eAcs);       // exp(Acs_i)
  exp_affine(s.Acs, n, -1.f, a_end, s.wend);    // exp(Acs_end - Acs_j)

  // M = CB * exp(Acs_i - Acs_j), lower triangle incl. the diagonal, zero above.
  for (int64_t i = 0; i < n; ++i) {
    float* Mi = s.M + i * L;
    exp_affine(s.Acs, i + 1, -1.f, s.Acs[i], Mi);
    const float* CBi = s.CB + i * L;
#pragma omp simd
    for (int64_t j = 0; j <= i; ++j) Mi[j] *= CBi[j];
    std::fill(Mi + i + 1, Mi + n, 0.f);
  }

  gather_rows<TIn>(p.x, c0, n, h, P, s.X);
  for (int64_t i = 0; i < n; ++i) {
    const float d = s.dt[i];
#pragma omp simd
    for (int64_t q = 0; q < P; ++q) s.Xdt[i * P + q] = s.X[i * P + q] * d;
  }

  // Y = exp(Acs) * (C St) + M Xdt
  const Mm::B St_op = mm.operand(St, N, P, P, s.pack_St);
  mm.run(n, P, N, s.Cc, N, St_op, s.Y, P, false);
  for (int64_t i = 0; i < n; ++i) {
    const float e = s.eAcs[i];
#pragma omp simd
    for (int64_t q = 0; q < P; ++q) s.Y[i * P + q] *= e;
  }
  const Mm::B X_op = mm.operand(s.Xdt, n, P, P, s.pack_X);
  mm.run_lower_a(n, P, s.M, L, X_op, s.Y, P, true);

  const bool has_D = p.D != nullptr;
  const float D = has_D ? p.D[h] : 0.f;
  for (int64_t i = 0; i < n; ++i) {
    float* y = s.Y + i * P;
    const TIn* z = p.z.data ? p.z.row<const TIn>(c0 + i, h) : nullptr;
    if (has_D || z) mamba2::finish_row(y, p.x.row<const TIn>(c0 + i, h), z, D, has_D, P);
    store_row_streaming(y, p.out.row<TIn>(c0 + i, h), P);
  }

  // St = exp(Acs_end) St + B^T (exp(Acs_end - Acs_j) * Xdt)   (Xdt rows scaled in place: no longer needed)
  const float e_end = s.eAcs[n - 1];
  for (int64_t i = 0; i < N * P; ++i) St[i] *= e_end;
  for (int64_t i = 0; i < n; ++i) {
    const float w = s.wend[i];
#pragma omp simd
    for (int64_t q = 0; q < P; ++q) s.Xdt[i * P + q] *= w;
  }
  const Mm::B Xw_op = mm.operand(s.Xdt, n, P, P, s.pack_Xw);
  mm.run(N, P, n, s.Bt, L, Xw_op, St, P, true);
}

// Heads per task: a divisor of the heads per group (they share C, B and C B^T), at most 8 and
// whose states fit in 256 KiB, as large as possible while every thread still gets an even share.
int64_t heads_per_task(const Mamba2Params& p) {
  const int64_t hpg = p.H / p.G, threads = num_threads();
  for (int64_t hb = std::min<int64_t>(8, hpg); hb > 1; --hb) {
    if (hpg % hb || hb * p.Nst * p.P > 65536) continue;
    const int64_t tasks = p.N * (p.H / hb);
    if (tasks % threads == 0 || tasks >= 4 * threads) return hb;
  }
  return 1;
}

template <class TIn, class TS>
void chunk_kernel(const Mamba2Params& p, bool bf16_gemm) {
  const int64_t N = p.Nst, P = p.P, L = kChunk, hpg = p.H / p.G;
  const int64_t hb = heads_per_task(p), blocks = p.H / hb;
  const size_t scratch_floats = Scratch().carve(nullptr, N, P, hb);

  parallel_for(p.N * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    s.carve(thread_scratch(scratch_floats), N, P, hb);
    const Mm mm(p.gemm, bf16_gemm, s.a_bf16);
    for (int64_t task = begin; task < end; ++task) {
      // Head-major order: the static split gives each thread an equal share of every sequence.
      const int64_t h0 = task / p.N * hb, seq = task % p.N, g = h0 / hpg;
      const int64_t bos = p.cu_seqlens[seq], eos = p.cu_seqlens[seq + 1];
      const int64_t slot = p.state_indices[seq];
      if (slot < 0) {  // padding: zero output, no slot touched
        for (int64_t h = h0; h < h0 + hb; ++h)
          for (int64_t t = bos; t < eos; ++t) std::fill_n(p.out.row<TIn>(t, h), P, from_float<TIn>(0.f));
        continue;
      }
      TS* state = static_cast<TS*>(p.state.data) + slot * p.state.slot_stride + h0 * P * N;
      const bool has_init = p.has_initial_state == nullptr || p.has_initial_state[seq];
      for (int64_t r = 0; r < hb; ++r) {
        if (has_init) {
          load_state(state + r * P * N, P, N, s.tmp, s.St + r * N * P);
        } else {
          std::fill_n(s.St + r * N * P, N * P, 0.f);
        }
      }
      const int64_t ck_off = p.checkpoint_offsets ? p.checkpoint_offsets[seq] : 0;
      const int64_t ck = ck_off > 0 ? bos + ck_off : -1;

      for (int64_t c0 = bos; c0 < eos;) {
        int64_t n = std::min(L, eos - c0);
        if (ck > c0 && ck < c0 + n) n = ck - c0;
        gather_rows<TIn>(p.C, c0, n, g, N, s.Cc);
        gather_rows<TIn>(p.B, c0, n, g, N, s.Bc);
        transpose(s.Bc, n, N, N, s.Bt, L);
        const Mm::B Bt_op = mm.operand(s.Bt, N, n, L, s.pack_Bt);
        mm.run_lower_c(n, N, s.Cc, N, Bt_op, s.CB, L);
        for (int64_t r = 0; r < hb; ++r) head_chunk<TIn>(p, mm, s, h0 + r, c0, n, s.St + r * N * P);
        c0 += n;
        if (c0 == ck) {
          TS* dst = static_cast<TS*>(p.state.data) + p.checkpoint_slots[seq] * p.state.slot_stride + h0 * P * N;
          for (int64_t r = 0; r < hb; ++r) store_state(s.St + r * N * P, P, N, s.tmp, dst + r * P * N);
        }
      }
      for (int64_t r = 0; r < hb; ++r) store_state(s.St + r * N * P, P, N, s.tmp, state + r * P * N);
    }
    streaming_stores_done();
    if (p.gemm.release) p.gemm.release();
  });
}

}  // namespace

void mamba2_chunk_scan(const Mamba2Params& p) {
  const bool bf16_gemm = has_bf16_gemm(p.gemm) && p.x.dtype == DType::kBFloat16;
  dispatch_dtype(p.x.dtype, [&](auto in_tag) {
    dispatch_dtype(p.state.dtype, [&](auto state_tag) {
      chunk_kernel<decltype(in_tag), decltype(state_tag)>(p, bf16_gemm);
    });
  });
}

}  // namespace GDN_ISA
}  // namespace gdn
