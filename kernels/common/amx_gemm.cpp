// bf16 GEMM on AMX tiles for the chunked prefill: C[M, N] (+)= A[M, K] B[K, N], A bf16 row-major
// (K even), B packed in bf16 pairs along K (params.h), fp32 accumulation. The chunk kernel calls it
// for every small product of every chunk (64 x 64 .. 128 x 128), so it must cost next to nothing
// per call: one tile configuration per thread and parallel region (oneDNN's brgemm, reached through
// ATen, looked its kernel up and reconfigured the tiles on every change of shape, and its products
// ran at a quarter of the tile rate). Tiles cover the 16-row / 16-column / 32-K blocks; the edges go
// through the AVX512-BF16 micro-kernel, which reads the same operand layouts.
#include <immintrin.h>

#include <cstring>

#include "common/gemm.h"
#include "common/gemm_backends.h"

namespace gdn {
namespace {

using amx::gemm_bf16;

// Tiles 0-3: C blocks (16 x 16 fp32); 4-5: A (16 rows x 32 bf16); 6-7: B (16 pairs x 16 columns).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

thread_local bool tiles_configured = false;

void configure_tiles() {
  if (tiles_configured) return;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
  tiles_configured = true;
}

// One MB x NB block of 16 x 16 C tiles (MB, NB in {1, 2}) over K32 (a multiple of 32).
template <int MB, int NB>
inline void tile_block(int64_t K32, const uint16_t* A, int64_t lda, const uint32_t* B, int64_t ldb, float* C,
                       int64_t ldc, bool accumulate) {
  const int64_t sa = lda * 2, sb = ldb * 4, sc = ldc * 4;  // strides in bytes
  if (accumulate) {
    _tile_loadd(0, C, sc);
    if (NB == 2) _tile_loadd(1, C + 16, sc);
    if (MB == 2) _tile_loadd(2, C + 16 * ldc, sc);
    if (MB == 2 && NB == 2) _tile_loadd(3, C + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if (NB == 2) _tile_zero(1);
    if (MB == 2) _tile_zero(2);
    if (MB == 2 && NB == 2) _tile_zero(3);
  }
  for (int64_t k = 0; k < K32; k += 32) {
    _tile_loadd(4, A + k, sa);
    _tile_loadd(6, B + k / 2 * ldb, sb);
    _tile_dpbf16ps(0, 4, 6);
    if (NB == 2) {
      _tile_loadd(7, B + k / 2 * ldb + 16, sb);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (MB == 2) {
      _tile_loadd(5, A + 16 * lda + k, sa);
      _tile_dpbf16ps(2, 5, 6);
      if (NB == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, C, sc);
  if (NB == 2) _tile_stored(1, C + 16, sc);
  if (MB == 2) _tile_stored(2, C + 16 * ldc, sc);
  if (MB == 2 && NB == 2) _tile_stored(3, C + 16 * ldc + 16, sc);
}

template <int MB>
inline void tile_row(int64_t N16, int64_t K32, const uint16_t* A, int64_t lda, const uint32_t* B, int64_t ldb,
                     float* C, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 32 <= N16; j += 32) tile_block<MB, 2>(K32, A, lda, B + j, ldb, C + j, ldc, accumulate);
  if (j < N16) tile_block<MB, 1>(K32, A, lda, B + j, ldb, C + j, ldc, accumulate);
}

}  // namespace

void amx_tile_gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint32_t* B,
                        int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int64_t Ke = (K + 1) / 2 * 2, M16 = M / 16 * 16, N16 = N / 16 * 16, K32 = Ke / 32 * 32;
  if (M16 == 0 || N16 == 0 || K32 == 0) return gemm_bf16(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  configure_tiles();
  int64_t i = 0;
  for (; i + 32 <= M16; i += 32) tile_row<2>(N16, K32, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  if (i < M16) tile_row<1>(N16, K32, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  // Edges: the K tail of the tiled block, then the right columns and the bottom rows in full.
  if (K32 < Ke) gemm_bf16(M16, N16, Ke - K32, A + K32, lda, B + K32 / 2 * ldb, ldb, C, ldc, true);
  if (N16 < N) gemm_bf16(M16, N - N16, K, A, lda, B + N16, ldb, C + N16, ldc, accumulate);
  if (M16 < M) gemm_bf16(M - M16, N, K, A + M16 * lda, lda, B, ldb, C + M16 * ldc, ldc, accumulate);
}

void amx_tile_release() {
  if (!tiles_configured) return;
  _tile_release();
  tiles_configured = false;
}

}  // namespace gdn
