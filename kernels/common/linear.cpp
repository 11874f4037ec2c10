// linear: out[M, N] = x[M, K] weight[N, K]^T (+ bias[N]) for small token counts M, with the weight in
// its plain row-major layout (the tensor torch's GEMM uses for large M: no repacking, no copy).
//
// At decode-sized M the cost is streaming the weight once, so the kernel is built around that
// stream: threads split the rows of the weight (N) into contiguous ranges; each register tile is
// kRows weight rows x up to kTokens tokens, whose kRows x kTokens dot products accumulate in vector
// registers over a chunk of K (each weight vector is loaded and converted to fp32 once per tile and
// used for every token of the tile, each x vector for every row). Further token tiles re-read the
// same row chunk from L1 (a 4-row fp32 chunk of kKChunk columns is 16 KiB). x arrives as fp32 (the
// host converts other dtypes once); bf16 weights widen by a shift, fp16 through vcvtph2ps / F16C.
// fp32 accumulation; out is rounded once to its dtype.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "common/parallel.h"
#include "common/vec.h"

namespace gdn {
namespace GDN_ISA {

// int8 weights (weight-only quantization, per-row scales applied to the sums): sign-extended and
// converted in registers (vpmovsxbd + vcvtdq2ps on x86), the same tiles as the float weights.
inline vfloat vload_float(const int8_t* p) {
#if defined(__AVX512F__)
  const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  return reinterpret_cast<const vfloat&>(x);
#elif defined(__AVX2__)
  const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  return reinterpret_cast<const vfloat&>(x);
#else
  typedef int8_t vbyte __attribute__((vector_size(kVecWidth)));
  typedef int32_t vint __attribute__((vector_size(kVecWidth * sizeof(int32_t))));
  vbyte b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(__builtin_convertvector(b, vint), vfloat);
#endif
}
inline float to_float(int8_t x) { return static_cast<float>(x); }

namespace {

constexpr int kRows = 4;            // weight rows per register tile
// Tokens per register tile: kRows x kTokens accumulators, kRows weight vectors and an x vector must
// fit the register file (32 vector registers with AVX-512, 16 with AVX2/SSE: 4 x 4 would spill there;
// measured no faster or slower at M = 16, where AVX2's FMA rate is the limit).
constexpr int kTokens = kVecWidth >= 16 ? 4 : 2;
constexpr int64_t kKChunk = 1024;   // columns per pass over a row block

// With several token tiles per row block, the next block's requests are spread over all of them
// (per_step lines per k step, walking the next block's rows of the current column chunk) so that they
// overlap the arithmetic; with one tile the first-tile burst below does as well.
struct LinePrefetcher {
  const char* p = nullptr;
  const char* row_end = nullptr;
  int64_t stride = 0, row_bytes = 0, rows_left = 0;
  int per_step = 0;
  inline void step() {
    for (int i = 0; i < per_step && rows_left > 0; ++i) {
      __builtin_prefetch(p, 0, 2);
      p += 64;
      if (p >= row_end) {
        --rows_left;
        row_end += stride;
        p = row_end - row_bytes;
      }
    }
  }
};

inline float hsum(vfloat v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<const __m512&>(v));
#else
  float s = 0.f;
  for (int i = 0; i < kVecWidth; ++i) s += v[i];
  return s;
#endif
}

// acc[t * R + r] += sum_{k in [k0, k1)} w[r][k] x[t][k] for R rows of w (row stride ldw) and T tokens
// of x (row stride ldx).
template <int R, int T, class TW>
inline void tile(const TW* __restrict w, int64_t ldw, const float* __restrict x, int64_t ldx, int64_t k0,
                 int64_t k1, float* __restrict acc, bool prefetch, LinePrefetcher& lp) {
  vfloat a[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) a[t][r] = vfloat{};
  int64_t k = k0;
  for (; k + kVecWidth <= k1; k += kVecWidth) {
    vfloat wv[R];
    // The next row block, same columns, into L2: the hardware prefetchers stop at each 4 KiB page,
    // which a weight row of K = 1024 fp32 fills exactly.
    lp.step();
    if (prefetch && (k * int64_t(sizeof(TW))) % 64 == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(w + (R + r) * ldw + k, 0, 2);
    for (int r = 0; r < R; ++r) wv[r] = vload_float(w + r * ldw + k);
    for (int t = 0; t < T; ++t) {
      const vfloat xv = vload(x + t * ldx + k);
      for (int r = 0; r < R; ++r) a[t][r] += wv[r] * xv;
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t * R + r] += hsum(a[t][r]);
  for (; k < k1; ++k) {
    for (int r = 0; r < R; ++r) {
      const float wr = to_float(w[r * ldw + k]);
      for (int t = 0; t < T; ++t) acc[t * R + r] += wr * x[t * ldx + k];
    }
  }
}

template <int R, class TW>
inline void tile_tokens(int T, const TW* w, int64_t ldw, const float* x, int64_t ldx, int64_t k0, int64_t k1,
                        float* acc, bool pf, LinePrefetcher& lp) {
  switch (T) {
    case 1: tile<R, 1>(w, ldw, x, ldx, k0, k1, acc, pf, lp); break;
    case 2: tile<R, 2>(w, ldw, x, ldx, k0, k1, acc, pf, lp); break;
    case 3: tile<R, 3>(w, ldw, x, ldx, k0, k1, acc, pf, lp); break;
    default: tile<R, kTokens>(w, ldw, x, ldx, k0, k1, acc, pf, lp); break;
  }
}

template <class TW>
inline void tile_any(int R, int T, const TW* w, int64_t ldw, const float* x, int64_t ldx, int64_t k0, int64_t k1,
                     float* acc, bool pf, LinePrefetcher& lp) {
  switch (R) {
    case 1: tile_tokens<1>(T, w, ldw, x, ldx, k0, k1, acc, pf, lp); break;
    case 2: tile_tokens<2>(T, w, ldw, x, ldx, k0, k1, acc, pf, lp); break;
    case 3: tile_tokens<3>(T, w, ldw, x, ldx, k0, k1, acc, pf, lp); break;
    default: tile_tokens<kRows>(T, w, ldw, x, ldx, k0, k1, acc, pf, lp); break;
  }
}

inline void store_out(const Mat2& out, int64_t m, int64_t n, float v) {
  switch (out.dtype) {
    case DType::kFloat32: static_cast<float*>(out.data)[m * out.row_stride + n] = v; break;
    case DType::kBFloat16: static_cast<bf16_t*>(out.data)[m * out.row_stride + n] = from_float<bf16_t>(v); break;
    case DType::kFloat16: static_cast<half_t*>(out.data)[m * out.row_stride + n] = from_float<half_t>(v); break;
  }
}

template <class TW>
void linear_kernel(const LinearParams& p) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const TW* weight = static_cast<const TW*>(p.weight);
  const int64_t blocks = (N + kRows - 1) / kRows;
  // Tasks of at least ~64 KiB of weights (a parallel region costs a few microseconds), yet small
  // enough that even N = 64 rows of K = 1024 splits over two threads.
  const int64_t block_bytes = kRows * std::max<int64_t>(K, 1) * int64_t(sizeof(TW));
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / block_bytes);
  // int8 weights with more than one token tile: each row chunk is converted once into an fp32 copy
  // (kRows x kKChunk, 16 KiB, stays in L1) that the token tiles read, instead of once per tile.
  constexpr bool kInt8 = std::is_same<TW, int8_t>::value;
  const bool widen_chunks = kInt8 && M > kTokens;
  parallel_for(blocks, grain, [&](int64_t b0, int64_t b1) {
    // [M][kRows] partial sums, then (int8, several token tiles) the fp32 row chunk
    float* acc = thread_scratch(static_cast<size_t>(M) * kRows + (widen_chunks ? kRows * kKChunk : 0));
    float* wide = acc + M * kRows;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRows;
      const int R = static_cast<int>(std::min<int64_t>(kRows, N - n0));
      const TW* w = weight + n0 * K;
      std::fill(acc, acc + M * kRows, 0.f);
      for (int64_t k0 = 0; k0 < K; k0 += kKChunk) {
        const int64_t k1 = std::min(K, k0 + kKChunk);
        LinePrefetcher lp;
        if (M > kTokens) {
          const int64_t row_bytes = (k1 - k0) * int64_t(sizeof(TW));
          const int64_t steps = (M + kTokens - 1) / kTokens * std::max<int64_t>(1, (k1 - k0) / kVecWidth);
          lp.p = reinterpret_cast<const char*>(w + kRows * K + k0);
          lp.row_bytes = row_bytes;
          lp.row_end = lp.p + row_bytes;
          lp.stride = K * int64_t(sizeof(TW));
          lp.rows_left = kRows;
          lp.per_step = static_cast<int>((kRows * ((row_bytes + 63) / 64) + steps - 1) / steps);
        }
        for (int64_t m0 = 0; m0 < M; m0 += kTokens) {
          const int T = static_cast<int>(std::min<int64_t>(kTokens, M - m0));
          // One token tile: it also requests the next block's rows as it goes (prefetches never fault: past
          // the end of the weight they cost only the request). Measured (1 thread, cold weights, CPU time):
          // +5-15% at M = 1-4 over none. Several tiles: the requests spread over all of them (lp), which
          // measured 1-12% faster than the first-tile burst at M = 16 and 10% slower at M = 4, K = 4096.
          if (widen_chunks) {
            if (m0 == 0) {
              const int64_t len = k1 - k0;
              for (int r = 0; r < R; ++r) {
                int64_t k = 0;
                for (; k + kVecWidth <= len; k += kVecWidth) vstore(wide + r * len + k, vload_float(w + r * K + k0 + k));
                for (; k < len; ++k) wide[r * len + k] = to_float(w[r * K + k0 + k]);
              }
            }
            tile_any(R, T, wide, k1 - k0, p.x + m0 * p.x_stride + k0, p.x_stride, 0, k1 - k0, acc + m0 * kRows,
                     false, lp);
            continue;
          }
          tile_any(R, T, w, K, p.x + m0 * p.x_stride, p.x_stride, k0, k1, acc + m0 * kRows, M <= kTokens, lp);
        }
      }
      // acc of token tile m0 holds [T][R]: token m lies at m0 * kRows + (m - m0) * R.
      for (int64_t m0 = 0; m0 < M; m0 += kTokens) {
        const int T = static_cast<int>(std::min<int64_t>(kTokens, M - m0));
        for (int t = 0; t < T; ++t)
          for (int r = 0; r < R; ++r) {
            const float sum = acc[m0 * kRows + t * R + r];
            const float v = (p.weight_scale ? sum * p.weight_scale[n0 + r] : sum) + (p.bias ? p.bias[n0 + r] : 0.f);
            store_out(p.out, m0 + t, n0 + r, v);
          }
      }
    }
  });
}

}  // namespace

void linear(const LinearParams& p) {
  if (p.M == 0 || p.N == 0) return;
  if (p.weight_scale != nullptr) return linear_kernel<int8_t>(p);
  dispatch_dtype(p.weight_dtype, [&](auto w_tag) { linear_kernel<decltype(w_tag)>(p); });
}

}  // namespace GDN_ISA
}  // namespace gdn
