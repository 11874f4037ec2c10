// The per-chunk math of chunk_gated_delta_rule (the chunked WY / UT-transform form of the gated
// delta rule, as in flash-linear-attention), shared by its two schedules: the sequential walk
// (chunk_gated_delta_rule.cpp: one task per (sequence, value head) walks its chunks in order) and
// the chunk-parallel one (chunk_parallel.cpp). Per chunk of n <= C tokens (q pre-scaled,
// gc = cumsum(g)):
//   L[i,j]  = beta_i (k_i.k_j) exp(gc_i - gc_j)          j < i
//   Tm      = (I + L)^-1 diag(beta)                       (forward substitution)
//   u       = Tm v,   w = -Tm (exp(gc) * k)
//   v_new   = u + w S
//   o       = (exp(gc) * q) S + P v_new,   P[i,j] = (q_i.k_j) exp(gc_i - gc_j), j <= i
//   S       = exp(gc_last) S + (exp(gc_last - gc) * k)^T v_new
// Every exponent is <= 0 (g <= 0), so nothing overflows. vllm_gdn_cpu.reference has the same
// algorithm in torch (chunk_gated_delta_rule_chunked_ref).
//
// The work splits in two: chunk_prepare (everything that does not read the state: the decayed
// masks, k k^T, q k^T, the triangular inverse, u, w, exp(gc) q, the decayed k^T) and
// chunk_state_step (the products with S and the state update, on any column block [v0, v0 + vb)
// of the state: columns of S, v_new and o are independent). Both schedules run the same calls,
// and a column block computes each element with the same operations in the same order as the
// whole row does (our GEMM kernels and AMX tiles treat columns independently; blocks start at
// multiples of 16): with GCC 12 here both schedules give bit-identical results on our own GEMM
// engines; a compiler may contract the narrower kernels' multiply-adds differently (GCC 13 on the
// test host did for fp32), and an external BLAS blocks by shape: tests allow 1e-5 relative.
//
// All products go through Mm, which runs them in fp32 or, for bf16 inputs on a bf16-capable GEMM
// path, rounds the operands to bf16 and accumulates in fp32 (the precision of FLA's GPU kernels).
// Products with a triangular operand are computed in row blocks that skip the zero triangle.
#pragma once
#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>

#include "common/gemm_engine.h"
#include "common/parallel.h"

namespace gdn {
namespace GDN_ISA {
namespace chunk {

constexpr int64_t kChunk = 64;

struct ChunkScratch {
  // Shared by the task's heads: k, q, kT, KK = k k^T, QK = q k^T. Per head: the rest; S holds one
  // state per head of the task.
  float *k, *q, *kT, *KK, *QK, *kT_decayed, *wq, *vo, *P, *Tm, *kg, *gc, *eg, *eg_inv, *beta, *S;
  uint16_t *a_bf16, *wq_bf16, *P_bf16, *kTd_bf16;
  uint32_t *pack_kT, *pack_v, *pack_kg, *pack_S, *pack_vnew;

  // Carves the buffers out of `base` (64-byte aligned each; base may be null to only count);
  // returns the number of floats used.
  size_t carve(float* base, int64_t K, int64_t V, int64_t heads) {
    const int64_t C = kChunk;
    size_t used = 0;
    auto take = [&](int64_t n) {
      float* r = base ? base + used : nullptr;
      used += static_cast<size_t>((n + 15) / 16 * 16);
      return r;
    };
    k = take(C * K), q = take(C * K), kT = take(K * C), KK = take(C * C), QK = take(C * C);
    kT_decayed = take(K * C), kg = take(C * K), wq = take(2 * C * K), vo = take(2 * C * V);
    P = take(C * C), Tm = take(C * C);
    gc = take(C), eg = take(C), eg_inv = take(C), beta = take(C), S = take(heads * K * V);
    // bf16 copies of the left operands: [k; q]-sized rows (2C x K), Tm / P (C x C), kT (K x C).
    a_bf16 = reinterpret_cast<uint16_t*>(take(C * std::max(2 * even(K), C) / 2));
    pack_kT = reinterpret_cast<uint32_t*>(take(even(K) / 2 * C));
    pack_v = reinterpret_cast<uint32_t*>(take(C / 2 * V));
    pack_kg = reinterpret_cast<uint32_t*>(take(C / 2 * K));
    pack_S = reinterpret_cast<uint32_t*>(take(even(K) / 2 * V));
    pack_vnew = reinterpret_cast<uint32_t*>(take(C / 2 * V));
    // bf16 copies of the state pass's left operands (see ChunkSlot)
    wq_bf16 = reinterpret_cast<uint16_t*>(take(C * even(K)));
    P_bf16 = reinterpret_cast<uint16_t*>(take(C * C / 2));
    kTd_bf16 = reinterpret_cast<uint16_t*>(take(K * C / 2));
    return used;
  }
};

// Consecutive rows of one head are a whole token apart (4 KiB and more): the hardware prefetchers
// do not follow that stride, and the rows alias to a few cache sets, so rows fetched a chunk ahead
// are evicted before use. Each row is fetched a few rows ahead of its use instead.
constexpr int64_t kRowsAhead = 8;  // measured: 8 rows ahead beat 16 and a whole chunk

// Rows [t, t + n) of one head (D values each) into L1.
template <class T>
inline void prefetch_head_rows(const Mat3& m, int64_t t, int64_t n, int64_t head, int64_t D) {
  prefetch_rows<3>(m.row<const T>(t, head), m.token_stride, n, D * static_cast<int64_t>(sizeof(T)));
}

// sum x^2 over x[0, n) in vector lanes, two accumulators, the lanes summed as a tree. vec.h's
// dot() vectorises its loop, but GCC sums the lanes of its reduction one by one through memory (a
// chain of 16 dependent adds on AVX-512), which made the l2 norm of a 128-wide row ~100 cycles.
inline float sum_squares(const float* x, int64_t n) {
  vfloat a0{}, a1{};
  int64_t i = 0;
  for (; i + 2 * kVecWidth <= n; i += 2 * kVecWidth) {
    const vfloat x0 = vload(x + i), x1 = vload(x + i + kVecWidth);
    a0 += x0 * x0, a1 += x1 * x1;
  }
  if (i + kVecWidth <= n) {
    const vfloat x0 = vload(x + i);
    a0 += x0 * x0, i += kVecWidth;
  }
  vfloat a = a0 + a1;
#if defined(__AVX512F__)
  float s = _mm512_reduce_add_ps(reinterpret_cast<const __m512&>(a));
#else
  for (int w = kVecWidth / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  float s = a[0];
#endif
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

// x <- x * mul / sqrt(sum(x^2) + eps), as vec.h's l2normalize (with the sum above).
inline void l2normalize_row(float* x, int64_t n, float mul) {
  const float r = mul / std::sqrt(sum_squares(x, n) + kL2NormEps);
  for (int64_t i = 0; i < n; ++i) x[i] *= r;
}

// Rows [bos, bos+n) of head `head` of a [T, H, D] tensor -> fp32 [n, D] (l2-normalised and scaled
// if asked).
template <class T>
inline void gather_rows(const Mat3& m, int64_t bos, int64_t n, int64_t head, int64_t D, float* dst, bool l2norm,
                 float mul) {
  for (int64_t i = 0; i < n; ++i) {
    float* row = dst + i * D;
    if (i + kRowsAhead < n) prefetch_head_rows<T>(m, bos + i + kRowsAhead, 1, head, D);
    load_row(m.row<const T>(bos + i, head), row, D);
    if (l2norm) {
      l2normalize_row(row, D, mul);
    } else if (mul != 1.f) {
      for (int64_t d = 0; d < D; ++d) row[d] *= mul;
    }
  }
}

// Row i of X = (I + L)^-1:  x_i = e_i - sum_{m<i} L[i, m] x_m, with rows m < i already final
// (zero right of their diagonal) and L[i, :] read from row i before it is overwritten. The row
// lives in NV vector registers (NV * kVecWidth > i), with two accumulator sets to halve the FMA
// dependency chain.
template <int NV>
inline void solve_row(float* X, int64_t i, int64_t ld) {
  const float* L = X + i * ld;
  vfloat acc0[NV], acc1[NV];
  for (int v = 0; v < NV; ++v) acc0[v] = vfloat{}, acc1[v] = vfloat{};
  int64_t m = 0;
  for (; m + 2 <= i; m += 2) {
    const vfloat l0 = vbroadcast(-L[m]), l1 = vbroadcast(-L[m + 1]);
    const float *x0 = X + m * ld, *x1 = x0 + ld;
    for (int v = 0; v < NV; ++v) {
      acc0[v] += l0 * vload(x0 + v * kVecWidth);
      acc1[v] += l1 * vload(x1 + v * kVecWidth);
    }
  }
  if (m < i) {
    const vfloat l0 = vbroadcast(-L[m]);
    for (int v = 0; v < NV; ++v) acc0[v] += l0 * vload(X + m * ld + v * kVecWidth);
  }
  float* row = X + i * ld;
  for (int v = 0; v < NV; ++v) vstore(row + v * kVecWidth, acc0[v] + acc1[v]);
  std::fill(row + i, row + ld, 0.f);
  row[i] = 1.f;
}

using SolveRowFn = void (*)(float*, int64_t, int64_t);
template <size_t... I>
constexpr std::array<SolveRowFn, sizeof...(I)> solve_row_table(std::index_sequence<I...>) {
  return {&solve_row<static_cast<int>(I) + 1>...};
}

// Tm = (I + L)^-1 for strictly lower L (given in Tm's strictly lower part on entry, the rest
// ignored); the upper triangle of the result is zeroed.
inline void invert_unit_lower(float* Tm, int64_t n, int64_t ld) {
  static constexpr auto kSolveRow = solve_row_table(std::make_index_sequence<kChunk / kVecWidth>{});
  for (int64_t i = 0; i < n; ++i) kSolveRow[i / kVecWidth](Tm, i, ld);
}


// Where chunk_prepare leaves one (chunk, value head)'s state-independent results, read by
// chunk_state_step: vo [2C, V] (rows [0, n): u, then v_new; rows [n, 2n): o), the left operands
// of the state pass wq [2C, K] (rows [0, n): w, rows [n, 2n): exp(gc) q), P [C, C] (lower incl.
// diagonal) and kTd [K, C] (the decayed k^T), and e_last = exp(gc_last). On a bf16 GEMM path the
// state pass reads those three from bf16 copies made once here (wq_bf16 [2C, even(K)], P_bf16
// [C, C], kTd_bf16 [K, C], each row zero-padded to an even length), the rounding Mm would apply
// to them on every call (so a state pass split into column blocks converts them once, not once
// per block); the fp32 ones are then only chunk_prepare's work space.
struct ChunkSlot {
  float *vo, *wq, *P, *kTd;
  uint16_t *wq_bf16, *P_bf16, *kTd_bf16;
  float e_last;
};

// C[M, N] (+)= A B for bf16 A (row-major, K even or zero-padded to even) and packed B: what
// Mm::run does after rounding its A to bf16.
inline void run_bf16(const GemmBackend& g, int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda,
                     const Mm::B& b, float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (g.bf16) {
    g.bf16(M, N, K, A, lda, b.packed, b.ldp, C, ldc, accumulate);
  } else {
#if defined(__AVX512BF16__)
    gemm_bf16(M, N, K, A, lda, b.packed, b.ldp, C, ldc, accumulate);
#endif
  }
}

// Mm::run_lower_a for a bf16 A.
inline void run_bf16_lower_a(const GemmBackend& g, int64_t M, int64_t N, const uint16_t* A, int64_t lda,
                             const Mm::B& b, float* C, int64_t ldc, bool accumulate) {
  if (g.triangle_block == 0) return run_bf16(g, M, N, M, A, lda, b, C, ldc, accumulate);
  for (int64_t i0 = 0; i0 < M; i0 += g.triangle_block) {
    const int64_t i1 = std::min(M, i0 + g.triangle_block);
    run_bf16(g, i1 - i0, N, i1, A + i0 * lda, lda, b, C + i0 * ldc, ldc, accumulate);
  }
}

// Loads rows [c0, c0 + n) of key head hk into s.k, s.q (l2-normalised, q scaled) and computes
// their transposed k, KK = k k^T (strictly lower used) and QK = q k^T (lower incl. diagonal),
// which the value heads of key head hk share.
template <class TIn>
void chunk_load_qk(const ChunkParams& p, const Mm& mm, ChunkScratch& s, int64_t hk, int64_t c0, int64_t n) {
  const int64_t K = p.K, C = kChunk;
  for (const Mat3* m : {&p.k, &p.q}) prefetch_head_rows<TIn>(*m, c0, std::min(n, kRowsAhead), hk, K);
  gather_rows<TIn>(p.k, c0, n, hk, K, s.k, p.use_qk_l2norm, 1.f);
  gather_rows<TIn>(p.q, c0, n, hk, K, s.q, p.use_qk_l2norm, p.scale);
  transpose(s.k, n, K, K, s.kT, C);
  const Mm::B kT_op = mm.operand(s.kT, K, n, C, s.pack_kT);
  mm.run_lower_c(n, K, s.k, K, kT_op, s.KK, C);
  mm.run_lower_c(n, K, s.q, K, kT_op, s.QK, C);
}

// The state-independent work of one chunk of value head h, given the chunk's shared k, q, kT, KK
// and QK in `s` (chunk_load_qk): fills d (all but e_last, which it returns).
template <class TIn>
float chunk_prepare(const ChunkParams& p, const Mm& mm, ChunkScratch& s, int64_t h, int64_t c0, int64_t n,
                    bool bf16_gemm, const ChunkSlot& d) {
  const int64_t K = p.K, V = p.V, C = kChunk;
  float* vnew = d.vo;       // rows [0, n) of vo: u (then v_new, in chunk_state_step)
  float* o = d.vo + n * V;  // rows [n, 2n): o
  prefetch_head_rows<TIn>(p.v, c0, std::min(n, kRowsAhead), h, V);
  gather_rows<TIn>(p.v, c0, n, h, V, vnew, false, 1.f);
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    acc += p.g[(c0 + i) * p.g_stride + h];
    s.gc[i] = acc;
    s.beta[i] = p.beta[(c0 + i) * p.beta_stride + h];
  }
  const float g_last = s.gc[n - 1];

  // P = QK * decay (lower incl. diagonal), Tm = strictly lower beta * KK * decay.
  // exp(gc_i - gc_j) = exp(gc_i) exp(-gc_j) costs 2n exps instead of n^2/2; exp(-gc_j) stays
  // finite while the chunk's total decay is above -80 (else one exp per entry).
  const bool factored = g_last > -80.f;
  exp_affine(s.gc, n, 1.f, 0.f, s.eg);  // also used by kg and qg below
  if (factored) exp_affine(s.gc, n, -1.f, 0.f, s.eg_inv);
  for (int64_t i = 0; i < n; ++i) {
    float* P_row = d.P + i * C;
    float* T_row = s.Tm + i * C;
    const float* QK_row = s.QK + i * C;
    const float* KK_row = s.KK + i * C;
    if (factored) {
      const float ei = s.eg[i], bi = s.beta[i] * s.eg[i];
#pragma omp simd
      for (int64_t j = 0; j <= i; ++j) {
        P_row[j] = QK_row[j] * ei * s.eg_inv[j];
        T_row[j] = bi * KK_row[j] * s.eg_inv[j];
      }
    } else {
      for (int64_t j = 0; j <= i; ++j) {
        const float dec = std::exp(s.gc[i] - s.gc[j]);
        P_row[j] = QK_row[j] * dec;
        T_row[j] = s.beta[i] * KK_row[j] * dec;
      }
    }
    for (int64_t j = i + 1; j < n; ++j) P_row[j] = 0.f;
  }
  invert_unit_lower(s.Tm, n, C);
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s.Tm[i * C + j] *= s.beta[j];
  }

  // u = Tm v (into vnew's rows), w = -Tm (exp(gc) k) (into wq's first n rows)
  for (int64_t i = 0; i < n; ++i) {
    const float e = -s.eg[i];
    for (int64_t j = 0; j < K; ++j) s.kg[i * K + j] = s.k[i * K + j] * e;
  }
  const Mm::B v_op = mm.operand(vnew, n, V, V, s.pack_v);
  const Mm::B kg_op = mm.operand(s.kg, n, K, K, s.pack_kg);
  if (bf16_gemm) {  // v was packed; u can overwrite it
    mm.run_lower_a(n, V, s.Tm, C, v_op, vnew, V, false);
  } else {          // fp32 reads v while writing u: go through o's rows
    mm.run_lower_a(n, V, s.Tm, C, v_op, o, V, false);
    std::copy(o, o + n * V, vnew);
  }
  mm.run_lower_a(n, K, s.Tm, C, kg_op, d.wq, K, false);
  float* qg = d.wq + n * K;
  for (int64_t i = 0; i < n; ++i) {
    const float e = s.eg[i];
    for (int64_t j = 0; j < K; ++j) qg[i * K + j] = s.q[i * K + j] * e;
  }

  // kTd = (exp(g_last - gc) * k)^T
  const float e_last = s.eg[n - 1];  // exp(g_last)
  float* decay_to_end = s.eg;        // exp(g_last - gc_i), reusing eg
  exp_affine(s.gc, n, -1.f, g_last, decay_to_end);
  for (int64_t r = 0; r < K; ++r) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d.kTd[r * C + i] = s.kT[r * C + i] * decay_to_end[i];
  }
  if (bf16_gemm) {  // P's entries right of the diagonal are zero up to column n, so its pad is too
    to_bf16_rows(d.wq, 2 * n, K, K, d.wq_bf16, even(K));
    to_bf16_rows(d.P, n, n, C, d.P_bf16, C);
    to_bf16_rows(d.kTd, K, n, C, d.kTd_bf16, C);
  }
  return e_last;
}

// The state-dependent work of one chunk of value head h on state columns [v0, v0 + vb): S is that
// [K, vb] block of the head's fp32 state (row stride ldS), updated in place; writes the output
// columns [v0, v0 + vb) of the chunk's rows. v_new and o live in d.vo's rows (in place) or, with
// `work` ([2C, vb]), in work, u's columns copied there: the chunk-parallel schedule then only reads
// the slot, which another thread wrote. Uses s's pack buffers only (and, in fp32, Mm's).
//
// `next` (chunk-parallel schedule): the slot this block reads at its next step, if already prepared
// (by another thread, so its lines sit in that core's cache): requested into this core's L2 a part
// before each product, so the transfer overlaps this step's arithmetic.
template <class TIn>
void chunk_state_step(const ChunkParams& p, const Mm& mm, ChunkScratch& s, int64_t h, int64_t c0, int64_t n,
                      const ChunkSlot& d, float* S, int64_t ldS, int64_t v0, int64_t vb, bool bf16_gemm,
                      float* work = nullptr, const ChunkSlot* next = nullptr) {
  const int64_t K = p.K, C = kChunk;
  const int64_t esize = bf16_gemm ? 2 : 4;  // the state pass's left operands, bf16 or fp32
  auto prefetch_l2 = [](const void* src, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(src) + b, 0, 2);
  };
  const int64_t V = work ? vb : p.V;  // row stride of v_new and o
  float* vnew = work ? work : d.vo + v0;
  float* o = vnew + n * V;
  if (work) {
    for (int64_t i = 0; i < n; ++i) std::copy_n(d.vo + i * p.V + v0, vb, work + i * vb);
  }
  // [v_new; o] = [u; 0] + [w; exp(gc) q] S   (one product: both rows share S)
  for (int64_t i = 0; i < n; ++i) std::fill_n(o + i * V, vb, 0.f);
  if (next) prefetch_l2(bf16_gemm ? static_cast<const void*>(next->wq_bf16) : next->wq, 2 * C * even(K) * esize);
  const Mm::B S_op = mm.operand(S, K, vb, ldS, s.pack_S);
  if (bf16_gemm) {
    run_bf16(p.gemm, 2 * n, vb, K, d.wq_bf16, even(K), S_op, vnew, V, true);
  } else {
    mm.run(2 * n, vb, K, d.wq, K, S_op, vnew, V, true);
  }

  // o += P v_new
  if (next) {
    prefetch_l2(bf16_gemm ? static_cast<const void*>(next->P_bf16) : next->P, C * C * esize);
    for (int64_t i = 0; i < C; ++i) prefetch_l2(next->vo + i * p.V + v0, vb * 4);
  }
  const Mm::B vnew_op = mm.operand(vnew, n, vb, V, s.pack_vnew);
  if (bf16_gemm) {
    run_bf16_lower_a(p.gemm, n, vb, d.P_bf16, C, vnew_op, o, V, true);
  } else {
    mm.run_lower_a(n, vb, d.P, C, vnew_op, o, V, true);
  }
  for (int64_t i = 0; i < n; ++i) store_row_streaming(o + i * V, p.out.row<TIn>(c0 + i, h) + v0, vb);

  // S = exp(g_last) S + (exp(g_last - gc) k)^T v_new
  if (next) prefetch_l2(bf16_gemm ? static_cast<const void*>(next->kTd_bf16) : next->kTd, K * C * esize);
  for (int64_t r = 0; r < K; ++r) {
    float* row = S + r * ldS;
    for (int64_t j = 0; j < vb; ++j) row[j] *= d.e_last;
  }
  if (bf16_gemm) {
    run_bf16(p.gemm, K, vb, n, d.kTd_bf16, C, vnew_op, S, ldS, true);
  } else {
    mm.run(K, vb, n, d.kTd, C, vnew_op, S, ldS, true);
  }
}

// The chunk-parallel schedule's split of chunk_state_step: the chain (the state's carrier) runs only
// v_new = u + w S and the state update; the output rows o = exp(gc) q S + P v_new go to a separate
// task (chunk_output), which any thread runs once every column block has passed the chunk. The step
// leaves what that task needs in `keep` (per column block, in the chunk's slot): on a bf16 GEMM path
// the packed operands it built anyway (S before the update, [even(K)/2, vb] words, and v_new,
// [C/2, vb] words); in fp32 a copy of S ([K, vb]) and v_new itself ([n, vb], computed there).
// Same operations in the same order as chunk_state_step: o starts at zero, gets exp(gc) q S, then
// P v_new; only the product's row count differs (n instead of 2n rows of [w; exp(gc) q]).
struct KeptOperands {
  float* S;     // bf16: packed words (reinterpreted); fp32: [K, vb] floats
  float* vnew;  // bf16: packed words; fp32: [n, vb] floats
};

template <class TIn>
void chunk_state_step_chain(const ChunkParams& p, const Mm& mm, const ChunkSlot& d, int64_t n, float* S,
                            int64_t ldS, int64_t v0, int64_t vb, bool bf16_gemm, float* work, const KeptOperands& keep,
                            const ChunkSlot* next = nullptr) {
  const int64_t K = p.K, C = kChunk;
  const int64_t esize = bf16_gemm ? 2 : 4;
  auto prefetch_l2 = [](const void* src, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(src) + b, 0, 2);
  };
  auto words = [](float* x) { return reinterpret_cast<uint32_t*>(x); };
  float* vnew = bf16_gemm ? work : keep.vnew;  // [n, vb]
  for (int64_t i = 0; i < n; ++i) std::copy_n(d.vo + i * p.V + v0, vb, vnew + i * vb);
  if (next) prefetch_l2(bf16_gemm ? static_cast<const void*>(next->wq_bf16) : next->wq, C * even(K) * esize);
  // v_new = u + w S
  if (bf16_gemm) {
    const Mm::B S_op = mm.operand(S, K, vb, ldS, words(keep.S));
    run_bf16(p.gemm, n, vb, K, d.wq_bf16, even(K), S_op, vnew, vb, true);
  } else {
    for (int64_t r = 0; r < K; ++r) std::copy_n(S + r * ldS, vb, keep.S + r * vb);
    mm.run(n, vb, K, d.wq, K, Mm::B{S, ldS, nullptr, 0}, vnew, vb, true);
  }
  if (next) {
    prefetch_l2(bf16_gemm ? static_cast<const void*>(next->kTd_bf16) : next->kTd, K * C * esize);
    for (int64_t i = 0; i < C; ++i) prefetch_l2(next->vo + i * p.V + v0, vb * 4);
  }
  // S = exp(g_last) S + (exp(g_last - gc) k)^T v_new
  const Mm::B vnew_op = bf16_gemm ? mm.operand(vnew, n, vb, vb, words(keep.vnew)) : Mm::B{vnew, vb, nullptr, 0};
  for (int64_t r = 0; r < K; ++r) {
    float* row = S + r * ldS;
    for (int64_t j = 0; j < vb; ++j) row[j] *= d.e_last;
  }
  if (bf16_gemm) {
    run_bf16(p.gemm, K, vb, n, d.kTd_bf16, C, vnew_op, S, ldS, true);
  } else {
    mm.run(K, vb, n, d.kTd, C, vnew_op, S, ldS, true);
  }
}

// The output columns [v0, v0 + vb) of one chunk of value head h from the operands its chain step
// kept; `o` is [n, vb] work space.
template <class TIn>
void chunk_output(const ChunkParams& p, const Mm& mm, int64_t h, int64_t c0, int64_t n, const ChunkSlot& d,
                  int64_t v0, int64_t vb, bool bf16_gemm, const KeptOperands& keep, float* o) {
  const int64_t K = p.K, C = kChunk;
  std::fill_n(o, n * vb, 0.f);
  if (bf16_gemm) {
    const Mm::B S_op{nullptr, 0, reinterpret_cast<const uint32_t*>(keep.S), vb};
    const Mm::B v_op{nullptr, 0, reinterpret_cast<const uint32_t*>(keep.vnew), vb};
    run_bf16(p.gemm, n, vb, K, d.wq_bf16 + n * even(K), even(K), S_op, o, vb, true);
    run_bf16_lower_a(p.gemm, n, vb, d.P_bf16, C, v_op, o, vb, true);
  } else {
    mm.run(n, vb, K, d.wq + n * K, K, Mm::B{keep.S, vb, nullptr, 0}, o, vb, true);
    mm.run_lower_a(n, vb, d.P, C, Mm::B{keep.vnew, vb, nullptr, 0}, o, vb, true);
  }
  for (int64_t i = 0; i < n; ++i) store_row_streaming(o + i * vb, p.out.row<TIn>(c0 + i, h) + v0, vb);
}

// The chunk-parallel schedule (chunk_parallel.cpp).
void chunk_parallel(const ChunkParams& p, bool bf16_gemm);

}  // namespace chunk
}  // namespace GDN_ISA
}  // namespace gdn
