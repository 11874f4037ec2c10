// Small fp32 GEMM for the per-ISA kernels: register-blocked micro-kernels over row-major operands,
// sized for the chunk kernel's 64 x {64,128,...} tiles.
#pragma once
#include "common/vec.h"

namespace gdn {
namespace GDN_ISA {

// Accumulators MR x NV vectors must fit the register file: 32 zmm with AVX-512, 16 ymm otherwise.
constexpr int kGemmMR = 4;
constexpr int kGemmNV = kVecWidth == 16 ? 4 : 2;

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
  int64_t i = 0;
  for (; i + kGemmMR <= M; i += kGemmMR)
    gemm_micro_nn<kGemmMR, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  for (; i < M; ++i) gemm_micro_nn<1, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
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

// dst[K, M] = transpose(src[M, K])
inline void transpose(const float* __restrict src, int64_t M, int64_t K, int64_t lds, float* __restrict dst,
                      int64_t ldd) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t p = 0; p < K; ++p) dst[p * ldd + i] = src[i * lds + p];
}

}  // namespace GDN_ISA
}  // namespace gdn
