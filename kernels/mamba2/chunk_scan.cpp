// mamba2_chunk_scan: prefill with the chunked SSD form of Mamba2 (as mamba_ssm's ssd_minimal). One
// task = (sequence, block of up to 8 heads of one group); it walks its chunks of up to L tokens in
// order, carrying each head's fp32 state, kept transposed as St [N, P] and the task's heads side by
// side ([N, heads * P]), so that every product below is a plain row-major GEMM and C St and the
// state update are one product each for all the task's heads. Per chunk (a = A dt <= 0,
// Acs = cumsum(a) within the chunk):
//   CB      = C B^T                          once per task and chunk, shared by the task's heads
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

// Chunk length: 128 tokens with bf16 products (AMX: the chunk state update's product has K = L, and
// per-chunk passes over the states amortise over more tokens; measured 12% faster than 64), 64 on
// fp32 paths (where the intra-chunk product's growth with L costs more than that saves: 6% slower).
constexpr int64_t kChunkBf16 = 128, kChunkF32 = 64;
constexpr int64_t kRowsAhead = 8;  // rows a token apart are prefetched this far ahead (as GDN's)

struct Scratch {
  // The task's hb heads side by side: Xdt, Y, Yi [L, hb*P] and St [N, hb*P] (head r in columns
  // [r*P, r*P + P)), so that C St and the state update are one product each for all of them.
  int64_t L;  // chunk length
  float *Cc, *Bc, *Bt, *CB, *M, *Xdt, *Y, *Yi, *tmp, *St, *dt, *Acs, *eAcs, *wend, *ones, *vb, *F;
  uint16_t* a_bf16;
  uint32_t *pack_Bt, *pack_St, *pack_X, *pack_Xw;

  size_t carve(float* base, int64_t chunk, int64_t N, int64_t P, int64_t hb) {
    L = chunk;
    const int64_t W = hb * P;
    size_t used = 0;
    auto take = [&](int64_t n) {
      float* r = base ? base + used : nullptr;
      used += static_cast<size_t>((n + 15) / 16 * 16);
      return r;
    };
    Cc = take(L * N), Bc = take(L * N), Bt = take(N * L), CB = take(L * L), M = take(L * L);
    Xdt = take(L * W), Y = take(L * W), Yi = take(L * W), tmp = take(P * N), St = take(N * W);
    dt = take(hb * L), Acs = take(hb * L), eAcs = take(hb * L), wend = take(hb * L), ones = take(1);
    vb = take(L + kVecWidth), F = take((L / kVecWidth + 1) * L);
    a_bf16 = reinterpret_cast<uint16_t*>(take(std::max({L * even(N), N * even(L), L * L}) / 2 + 1));
    pack_Bt = reinterpret_cast<uint32_t*>(take(even(N) / 2 * L));
    pack_St = reinterpret_cast<uint32_t*>(take(even(N) / 2 * W));
    pack_X = reinterpret_cast<uint32_t*>(take(L / 2 * W));
    pack_Xw = reinterpret_cast<uint32_t*>(take(L / 2 * W));
    return used;
  }
};

// Rows [t0, t0 + n) of head `head` of a [T, H, D] tensor -> fp32 [n, D] (row stride ldd).
template <class T>
void gather_rows(const Mat3& m, int64_t t0, int64_t n, int64_t head, int64_t D, float* dst, int64_t ldd) {
  const int64_t bytes = D * static_cast<int64_t>(sizeof(T));
  prefetch_rows<3>(m.row<const T>(t0, head), m.token_stride, std::min(n, kRowsAhead), bytes);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kRowsAhead < n) prefetch_rows<3>(m.row<const T>(t0 + i + kRowsAhead, head), m.token_stride, 1, bytes);
    load_row(m.row<const T>(t0 + i, head), dst + i * ldd, D);
  }
}

// Rows [t0, t0 + n) of heads [h0, h0 + hb) -> fp32 [n, hb*D], head r in columns [r*D, r*D + D),
// row i of head r scaled by scale[r * ld + i].
template <class T>
void gather_heads(const Mat3& m, int64_t t0, int64_t n, int64_t h0, int64_t hb, int64_t D, float* dst,
                  const float* scale, int64_t ld) {
  const int64_t W = hb * D;
  const bool packed = m.head_stride == D;  // the heads of a token are one contiguous row
  const int64_t bytes = (packed ? W : D) * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < n; ++i) {
    if (i + kRowsAhead < n) {
      for (int64_t r = 0; r < (packed ? 1 : hb); ++r)
        prefetch_rows<3>(m.row<const T>(t0 + i + kRowsAhead, h0 + r), m.token_stride, 1, bytes);
    }
    if (packed) {
      load_row(m.row<const T>(t0 + i, h0), dst + i * W, W);
    } else {
      for (int64_t r = 0; r < hb; ++r) load_row(m.row<const T>(t0 + i, h0 + r), dst + i * W + r * D, D);
    }
    for (int64_t r = 0; r < hb; ++r) {
      const float f = scale[r * ld + i];
      float* row = dst + i * W + r * D;
#pragma omp simd
      for (int64_t q = 0; q < D; ++q) row[q] *= f;
    }
  }
}

// Step sizes of tokens [c0, c0 + n), heads [h0, h0 + hb) (hb <= kMaxHeads) into dt[r * L + i],
// vectorised across the heads of a token; then per head the cumulative decays Acs (<= 0),
// exp(Acs) and exp(Acs_end - Acs).
constexpr int64_t kMaxHeads = 8;  // heads per task (measured here: 8 and 16 alike, 4 and 2 slower)
template <class TDt>
void chunk_decays(const Mamba2Params& p, int64_t L, int64_t h0, int64_t hb, int64_t c0, int64_t n, float* dt,
                  float* Acs, float* eAcs, float* wend) {
  constexpr int64_t kPad = (kMaxHeads + kVecWidth - 1) / kVecWidth * kVecWidth;
  alignas(64) float bias[kPad] = {}, row[kPad] = {};
  if (p.dt_bias) std::copy(p.dt_bias + h0, p.dt_bias + h0 + hb, bias);
  const TDt* src = static_cast<const TDt*>(p.dt.data) + c0 * p.dt.row_stride + h0;
  for (int64_t i = 0; i < n; ++i) {
    load_row(src + i * p.dt.row_stride, row, hb);
    for (int64_t v = 0; v < hb; v += kVecWidth) {
      vfloat d = vload(row + v) + vload(bias + v);
      if (p.dt_softplus) d = vsoftplus(d, 1.f, 20.f);
      d = d > p.dt_min ? d : vbroadcast(p.dt_min);
      d = d < p.dt_max ? d : vbroadcast(p.dt_max);
      vstore(row + v, d);
    }
    for (int64_t r = 0; r < hb; ++r) dt[r * L + i] = row[r];
  }
  for (int64_t r = 0; r < hb; ++r) {
    const float A = p.A[h0 + r];
    float *d = dt + r * L, *acs = Acs + r * L;
    float acc = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      acc += A * d[i];  // <= 0
      acs[i] = acc;
    }
    exp_affine(acs, n, 1.f, 0.f, eAcs + r * L);              // exp(Acs_i)
    exp_affine(acs, n, -1.f, acs[n - 1], wend + r * L);      // exp(Acs_end - Acs_j)
  }
}

// Rows i, i+1 of a [., W] fp32 matrix, column block r of width P scaled by f[r] (row i) and g[r]
// (row i+1; row i+1 may be absent), packed into bf16 pairs (VNNI row i/2 of the operand).
inline void pack_scaled_pair(const float* r0, const float* r1, int64_t hb, int64_t P, const float* f, int64_t fs,
                             const float* g, uint32_t* out) {
  for (int64_t r = 0; r < hb; ++r) {
    const float a = f[r * fs], b = r1 ? g[r * fs] : 0.f;
    const float *x0 = r0 + r * P, *x1 = r1 ? r1 + r * P : nullptr;
    uint32_t* o = out + r * P;
    int64_t q = 0;
#if defined(__AVX512F__)
    const vfloat va = vbroadcast(a), vb = vbroadcast(b);
    for (; q + kVecWidth <= P; q += kVecWidth)
      vstore_bf16_pair(reinterpret_cast<bf16_t*>(o + q), va * vload(x0 + q), x1 ? vb * vload(x1 + q) : vfloat{});
#endif
    for (; q < P; ++q)
      o[q] = from_float<bf16_t>(a * x0[q]).bits | (x1 ? uint32_t{from_float<bf16_t>(b * x1[q]).bits} << 16 : 0u);
  }
}

// M = CB * exp(Acs_i - Acs_j) for j <= i, zero above (rows [0, n), row stride L). In blocks of
// V = kVecWidth columns: below the diagonal block, exp(Acs_i - Acs_j) = exp(Acs_i - Acs_e)
// exp(Acs_e - Acs_j) with e the block's last column (e <= i and j <= e: both exponents <= 0), so
// an off-diagonal block costs two products and the exps are one vector per block (vb) and one per
// V rows and block (F); the diagonal block takes one vector exp per row, its exponents clamped at
// 0 for the masked j > i lanes. ~3x fewer exps than one per entry. Acs is padded in place to a
// whole number of blocks with its last value.
void decay_matrix(const float* CB, float* Acs, int64_t n, int64_t L, float* M, float* vb, float* F) {
  constexpr int64_t V = kVecWidth;
  const int64_t nb = (n + V - 1) / V;
  for (int64_t j = n; j < nb * V; ++j) Acs[j] = Acs[n - 1];
  alignas(64) float iota_buf[V];
  for (int64_t l = 0; l < V; ++l) iota_buf[l] = static_cast<float>(l);
  const vfloat iota = vload(iota_buf);
  for (int64_t b = 0; b < nb; ++b) {
    const float Ae = Acs[std::min(b * V + V - 1, n - 1)];
    vstore(vb + b * V, vexp(Ae - vload(Acs + b * V)));                                  // exp(Acs_e - Acs_j)
    for (int64_t i0 = (b + 1) * V; i0 < nb * V; i0 += V) vstore(F + b * L + i0, vexp(vload(Acs + i0) - Ae));
  }
  for (int64_t i = 0; i < n; ++i) {
    float* Mi = M + i * L;
    const float* CBi = CB + i * L;
    const int64_t bi = i / V;
    for (int64_t b = 0; b < bi; ++b) vstore(Mi + b * V, F[b * L + i] * vload(vb + b * V) * vload(CBi + b * V));
    vfloat d = Acs[i] - vload(Acs + bi * V);
    d = d < 0.f ? d : vfloat{};
    const vfloat m = vexp(d) * vload(CBi + bi * V);
    vstore(Mi + bi * V, iota <= static_cast<float>(i - bi * V) ? m : vfloat{});
    std::fill(Mi + (bi + 1) * V, Mi + std::max(n, (bi + 1) * V), 0.f);
  }
}

// One chunk [c0, c0 + n) of heads [h0, h0 + hb) (one group), given the group's C (Cc), B^T (Bt)
// and CB: writes the output rows and updates St.
template <class TIn>
void chunk_step(const Mamba2Params& p, const Mm& mm, bool bf16, Scratch& s, int64_t h0, int64_t hb, int64_t c0,
                int64_t n) {
  const int64_t N = p.Nst, P = p.P, L = s.L, W = hb * P;
  dispatch_dtype(p.dt.dtype, [&](auto tag) {
    chunk_decays<decltype(tag)>(p, L, h0, hb, c0, n, s.dt, s.Acs, s.eAcs, s.wend);
  });
  // Xdt = dt * x (each row scaled while it is in L1)
  gather_heads<TIn>(p.x, c0, n, h0, hb, P, s.Xdt, s.dt, L);

  // With bf16 products, both packings of Xdt in one pass: as is (the intra-chunk products' right
  // operand, every head) and scaled by exp(Acs_end - Acs_j) (the state update's).
  if (bf16) {
    for (int64_t i = 0; i < n; i += 2) {
      const float* r0 = s.Xdt + i * W;
      const float* r1 = i + 1 < n ? r0 + W : nullptr;
      pack_scaled_pair(r0, r1, hb, P, s.ones, 0, s.ones, s.pack_X + i / 2 * W);
      pack_scaled_pair(r0, r1, hb, P, s.wend + i, L, s.wend + i + 1, s.pack_Xw + i / 2 * W);
    }
  }

  // Y = C St, all heads in one product (scaled by exp(Acs_i) in the output pass below). With bf16
  // products the packing of St also applies its decay to the end of the chunk
  // (St = exp(Acs_end) St) in the same pass.
  const float* e_end = s.eAcs + (n - 1);  // exp(Acs_end) of head r at e_end[r * L]
  Mm::B St_op;
  if (bf16) {
    for (int64_t k = 0; k < N; k += 2) {
      float* r0 = s.St + k * W;
      float* r1 = k + 1 < N ? r0 + W : nullptr;
      pack_scaled_pair(r0, r1, hb, P, s.ones, 0, s.ones, s.pack_St + k / 2 * W);
      for (float* row : {r0, r1}) {
        if (!row) continue;
        for (int64_t r = 0; r < hb; ++r) {
          const float e = e_end[r * L];
#pragma omp simd
          for (int64_t q = 0; q < P; ++q) row[r * P + q] *= e;
        }
      }
    }
    St_op = Mm::B{nullptr, 0, s.pack_St, W};
  } else {
    St_op = mm.operand(s.St, N, W, W, s.pack_St);
  }
  mm.run(n, W, N, s.Cc, N, St_op, s.Y, W, false);
  if (!bf16) {
    for (int64_t k = 0; k < N; ++k) {
      for (int64_t r = 0; r < hb; ++r) {
        const float e = e_end[r * L];
        float* row = s.St + k * W + r * P;
#pragma omp simd
        for (int64_t q = 0; q < P; ++q) row[q] *= e;
      }
    }
  }

  // Yi_r = M_r Xdt_r,  M_r = CB * exp(Acs_i - Acs_j) (lower triangle incl. the diagonal)
  for (int64_t r = 0; r < hb; ++r) {
    decay_matrix(s.CB, s.Acs + r * L, n, L, s.M, s.vb, s.F);
    const Mm::B X_op = bf16 ? Mm::B{nullptr, 0, s.pack_X + r * P, W} : Mm::B{s.Xdt + r * P, W, nullptr, 0};
    mm.run_lower_a(n, P, s.M, L, X_op, s.Yi + r * P, W, false);
  }

  // y = exp(Acs_i) Y + Yi (+ D x, * silu(z)), one pass
  const bool has_D = p.D != nullptr;
  for (int64_t r = 0; r < hb; ++r) {
    const int64_t h = h0 + r;
    const float D = has_D ? p.D[h] : 0.f;
    for (int64_t i = 0; i < n; ++i) {
      float* yi = s.Yi + i * W + r * P;
      const float* y = s.Y + i * W + r * P;
      const float e = s.eAcs[r * L + i];
#pragma omp simd
      for (int64_t q = 0; q < P; ++q) yi[q] += e * y[q];
      const TIn* z = p.z.data ? p.z.row<const TIn>(c0 + i, h) : nullptr;
      if (has_D || z) mamba2::finish_row(yi, p.x.row<const TIn>(c0 + i, h), z, D, has_D, P);
      store_row_streaming(yi, p.out.row<TIn>(c0 + i, h), P);
    }
  }

  // St += B^T (exp(Acs_end - Acs_j) * Xdt), all heads in one product (bf16: packed above; fp32:
  // Xdt scaled in place, no longer needed).
  Mm::B Xw_op;
  if (bf16) {
    Xw_op = Mm::B{nullptr, 0, s.pack_Xw, W};
  } else {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t r = 0; r < hb; ++r) {
        const float w = s.wend[r * L + i];
        float* xd = s.Xdt + i * W + r * P;
#pragma omp simd
        for (int64_t q = 0; q < P; ++q) xd[q] *= w;
      }
    }
    Xw_op = Mm::B{s.Xdt, W, nullptr, 0};
  }
  mm.run(N, W, n, s.Bt, L, Xw_op, s.St, W, true);
}

// State slot heads [hb, P, N] (TS) <-> St [N, hb*P] fp32.
template <class TS>
void load_states(const TS* src, int64_t hb, int64_t P, int64_t N, float* tmp, float* St) {
  for (int64_t r = 0; r < hb; ++r) {
    load_row(src + r * P * N, tmp, P * N);
    transpose(tmp, P, N, N, St + r * P, hb * P);
  }
}
template <class TS>
void store_states(const float* St, int64_t hb, int64_t P, int64_t N, float* tmp, TS* dst) {
  for (int64_t r = 0; r < hb; ++r) {
    transpose(St + r * P, N, P, hb * P, tmp, N);
    store_row(tmp, dst + r * P * N, P * N);
  }
}

// Heads per task: a divisor of the heads per group (they share C, B and C B^T, and their products
// with them run as one), at most kMaxHeads and whose states fit in 512 KiB, as large as possible while
// every thread still gets an even share.
int64_t heads_per_task(const Mamba2Params& p) {
  const int64_t hpg = p.H / p.G, threads = num_threads();
  for (int64_t hb = std::min<int64_t>(kMaxHeads, hpg); hb > 1; --hb) {
    if (hpg % hb || hb * p.Nst * p.P > 131072) continue;
    const int64_t tasks = p.N * (p.H / hb);
    if (tasks % threads == 0 || tasks >= 4 * threads) return hb;
  }
  return 1;
}

template <class TIn, class TS>
void chunk_kernel(const Mamba2Params& p, bool bf16_gemm) {
  const int64_t N = p.Nst, P = p.P, L = bf16_gemm ? kChunkBf16 : kChunkF32, hpg = p.H / p.G;
  const int64_t hb = heads_per_task(p), blocks = p.H / hb;
  const size_t scratch_floats = Scratch().carve(nullptr, L, N, P, hb);

  parallel_for(p.N * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    s.carve(thread_scratch(scratch_floats), L, N, P, hb);
    s.ones[0] = 1.f;
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
      if (p.has_initial_state == nullptr || p.has_initial_state[seq]) {
        load_states(state, hb, P, N, s.tmp, s.St);
      } else {
        std::fill_n(s.St, N * hb * P, 0.f);
      }
      const int64_t ck_off = p.checkpoint_offsets ? p.checkpoint_offsets[seq] : 0;
      const int64_t ck = ck_off > 0 ? bos + ck_off : -1;

      for (int64_t c0 = bos; c0 < eos;) {
        int64_t n = std::min(L, eos - c0);
        if (ck > c0 && ck < c0 + n) n = ck - c0;
        gather_rows<TIn>(p.C, c0, n, g, N, s.Cc, N);
        gather_rows<TIn>(p.B, c0, n, g, N, s.Bc, N);
        transpose(s.Bc, n, N, N, s.Bt, L);
        const Mm::B Bt_op = mm.operand(s.Bt, N, n, L, s.pack_Bt);
        mm.run_lower_c(n, N, s.Cc, N, Bt_op, s.CB, L);
        chunk_step<TIn>(p, mm, bf16_gemm, s, h0, hb, c0, n);
        c0 += n;
        if (c0 == ck) {
          TS* dst = static_cast<TS*>(p.state.data) + p.checkpoint_slots[seq] * p.state.slot_stride + h0 * P * N;
          store_states(s.St, hb, P, N, s.tmp, dst);
        }
      }
      store_states(s.St, hb, P, N, s.tmp, state);
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
