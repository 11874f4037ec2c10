// Small fp32 GEMM for the per-ISA kernels: register-blocked micro-kernels over row-major operands,
// sized for the chunk kernel's 64 x {64,128,...} tiles.
#pragma once
#include <type_traits>

#include "common/vec.h"

namespace gdn {
namespace GDN_ISA {

// Accumulators MR x NV vectors must fit the register file: 32 zmm with AVX-512, 16 ymm otherwise.
constexpr int kGemmNV = kVecWidth == 16 ? 4 : 2;

// Runs micro(rows, i) over [0, M) in blocks of 6, then 4, 2, 1 rows.
template <class F>
inline void for_row_blocks(int64_t M, const F& micro) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) micro(std::integral_constant<int, 6>{}, i);
  for (; i + 4 <= M; i += 4) micro(std::integral_constant<int, 4>{}, i);
  for (; i + 2 <= M; i += 2) micro(std::integral_constant<int, 2>{}, i);
  for (; i < M; ++i) micro(std::integral_constant<int, 1>{}, i);
}

template <int MR, int NV>
inline void gemm_micro_nn(int64_t K, const float* __restrict A, int64_t lda, const float* __restrict B,
                          int64_t ldb, float* __restrict C, int64_t ldc, bool accumulate) {
  vfloat acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NV; ++n) acc[m][n] = accumulate ? vload(C + m * ldc + n * kVecWidth) : vfloat{};
  for (int64_t p = 0; p < K; ++p) {
    vfloat b[NV];
    for (int n = 0; n < NV; ++n) b[n] = vload(B + p * ldb + n * kVecWidth);
    for (int m = 0; m < MR; ++m) {
      const vfloat a = vbroadcast(A[m * lda + p]);
      for (int n = 0; n < NV; ++n) acc[m][n] += a * b[n];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NV; ++n) vstore(C + m * ldc + n * kVecWidth, acc[m][n]);
}

template <int NV>
inline void gemm_column_block(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                              float* C, int64_t ldc, bool accumulate) {
  for_row_blocks(M, [&](auto mr, int64_t i) {
    gemm_micro_nn<decltype(mr)::value, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  });
}

// C[M, N] (+)= A[M, K] @ B[K, N], row-major with leading dims lda, ldb, ldc.
inline void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    float* C, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + kGemmNV * kVecWidth <= N; j += kGemmNV * kVecWidth)
    gemm_column_block<kGemmNV>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate);
  for (; j + kVecWidth <= N; j += kVecWidth)
    gemm_column_block<1>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate);
  for (; j < N; ++j) {
    for (int64_t i = 0; i < M; ++i) {
      float s = accumulate ? C[i * ldc + j] : 0.f;
      for (int64_t p = 0; p < K; ++p) s += A[i * lda + p] * B[p * ldb + j];
      C[i * ldc + j] = s;
    }
  }
}

#if defined(__AVX512F__)
// dst[16, 16] = transpose(src[16, 16]) in registers: 64 shuffles instead of 256 scalar moves.
inline void transpose_16x16(const float* __restrict src, int64_t lds, float* __restrict dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {  // 2x2 blocks of single floats
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4x4 within each 128-bit lane
    for (int j = 0; j < 2; ++j) {
      const __m512d a = _mm512_castps_pd(t[i + j]), b = _mm512_castps_pd(t[i + j + 2]);
      r[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  }
  for (int i = 0; i < 16; i += 8) {  // 128-bit lanes across rows i..i+7
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {  // and across the two halves
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
}
constexpr int64_t kTransposeBlock = 16;
inline void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd) {
  transpose_16x16(src, lds, dst, ldd);
}
#elif defined(__AVX2__)
// dst[8, 8] = transpose(src[8, 8]) in registers: 24 shuffles instead of 64 scalar moves.
inline void transpose_8x8(const float* __restrict src, int64_t lds, float* __restrict dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {  // 2x2 blocks of single floats
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // 4x4 within each 128-bit lane
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {  // and across the 128-bit lanes of rows j and j + 4
    _mm256_storeu_ps(dst + j * ldd, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * ldd, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
  }
}
constexpr int64_t kTransposeBlock = 8;
inline void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd) {
  transpose_8x8(src, lds, dst, ldd);
}
#endif

// dst[K, M] = transpose(src[M, K])
inline void transpose(const float* __restrict src, int64_t M, int64_t K, int64_t lds, float* __restrict dst,
                      int64_t ldd) {
  int64_t i0 = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  constexpr int64_t B = kTransposeBlock;
  for (; i0 + B <= M; i0 += B) {
    int64_t p0 = 0;
    for (; p0 + B <= K; p0 += B) transpose_block(src + i0 * lds + p0, lds, dst + p0 * ldd + i0, ldd);
    for (int64_t i = i0; i < i0 + B; ++i)
      for (int64_t p = p0; p < K; ++p) dst[p * ldd + i] = src[i * lds + p];
  }
#endif
  for (int64_t i = i0; i < M; ++i)
    for (int64_t p = 0; p < K; ++p) dst[p * ldd + i] = src[i * lds + p];
}

// ---------------------------------------------------------------------------- bf16 (VNNI) operands

// Packs rows [0, K) of a row-major fp32 B[K, N] into bf16 pairs along K: out[p][n] holds
// (B[2p][n], B[2p+1][n]); an odd last row is paired with zero. ldo is in 32-bit words.
inline void pack_vnni_rows(const float* B, int64_t K, int64_t N, int64_t ldb, uint32_t* out, int64_t ldo) {
  for (int64_t p = 0; 2 * p < K; ++p) {
    const float* r0 = B + 2 * p * ldb;
    const bool has_r1 = 2 * p + 1 < K;
    const float* r1 = r0 + ldb;
    uint32_t* o = out + p * ldo;
    int64_t n = 0;
    for (; n + kVecWidth <= N; n += kVecWidth) {
#if defined(__AVX512F__)
      vstore_bf16_pair(reinterpret_cast<bf16_t*>(o + n), vload(r0 + n), has_r1 ? vload(r1 + n) : vfloat{});
#else
      const vuint lo = bf16_bits(vload(r0 + n));
      const vuint hi = has_r1 ? bf16_bits(vload(r1 + n)) << 16 : vuint{};
      *reinterpret_cast<vuint_unaligned*>(o + n) = lo | hi;
#endif
    }
    for (; n < N; ++n)
      o[n] = from_float<bf16_t>(r0[n]).bits | (has_r1 ? uint32_t{from_float<bf16_t>(r1[n]).bits} << 16 : 0u);
  }
}

// fp32 rows -> bf16 rows with an even, zero-padded row length.
inline void to_bf16_rows(const float* src, int64_t M, int64_t K, int64_t lds, uint16_t* dst, int64_t ldd) {
  for (int64_t i = 0; i < M; ++i) {
    store_row(src + i * lds, reinterpret_cast<bf16_t*>(dst + i * ldd), K);
    if (K % 2) dst[i * ldd + K] = 0;
  }
}

#if defined(__AVX512BF16__)
// C (+)= A B with vdpbf16ps: each instruction multiplies 16 columns x 2 K-steps, fp32 accumulate.
template <int MR, int NV>
inline void gemm_bf16_micro(int64_t Kp, const uint16_t* __restrict A, int64_t lda, const uint32_t* __restrict B,
                            int64_t ldb, float* __restrict C, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NV; ++n) acc[m][n] = accumulate ? _mm512_loadu_ps(C + m * ldc + n * 16) : _mm512_setzero_ps();
  for (int64_t p = 0; p < Kp; ++p) {
    __m512i b[NV];
    for (int n = 0; n < NV; ++n) b[n] = _mm512_loadu_si512(B + p * ldb + n * 16);
    for (int m = 0; m < MR; ++m) {
      const __m512i a = _mm512_set1_epi32(reinterpret_cast<const uint32_t*>(A + m * lda)[p]);
      for (int n = 0; n < NV; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], (__m512bh)a, (__m512bh)b[n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NV; ++n) _mm512_storeu_ps(C + m * ldc + n * 16, acc[m][n]);
}

template <int NV>
inline void gemm_bf16_column_block(int64_t M, int64_t Kp, const uint16_t* A, int64_t lda, const uint32_t* B,
                                   int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for_row_blocks(M, [&](auto mr, int64_t i) {
    gemm_bf16_micro<decltype(mr)::value, NV>(Kp, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  });
}

// C[M, N] (+)= A[M, K] B[K, N]; A bf16 row-major with K even (pad with a zero column), B VNNI-packed.
inline void gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint32_t* B, int64_t ldb,
                      float* C, int64_t ldc, bool accumulate) {
  const int64_t Kp = (K + 1) / 2;
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) gemm_bf16_column_block<4>(M, Kp, A, lda, B + j, ldb, C + j, ldc, accumulate);
  for (; j + 16 <= N; j += 16) gemm_bf16_column_block<1>(M, Kp, A, lda, B + j, ldb, C + j, ldc, accumulate);
  for (; j < N; ++j) {  // scalar tail columns
    for (int64_t i = 0; i < M; ++i) {
      float s = accumulate ? C[i * ldc + j] : 0.f;
      for (int64_t p = 0; p < Kp; ++p) {
        const uint32_t w = B[p * ldb + j];
        s += to_float(bf16_t{A[i * lda + 2 * p]}) * to_float(bf16_t{static_cast<uint16_t>(w)});
        s += to_float(bf16_t{A[i * lda + 2 * p + 1]}) * to_float(bf16_t{static_cast<uint16_t>(w >> 16)});
      }
      C[i * ldc + j] = s;
    }
  }
}
#endif

}  // namespace GDN_ISA
}  // namespace gdn
