// The GEMM engine of one kernel call (Mm): the GEMM path chosen at run time (GemmBackend: AMX
// tiles, an external sgemm, or this ISA's own micro-kernels) behind one interface, in fp32 or
// bf16 mode. Used by the chunked prefill and by the per-core GEMM probe.
#pragma once
#include <algorithm>

#include "common/gemm.h"

namespace gdn {
namespace GDN_ISA {

inline int64_t even(int64_t x) { return (x + 1) / 2 * 2; }

// Whether the engine can run bf16 GEMMs: its own bf16 function, or this ISA's vdpbf16ps kernel.
inline bool has_bf16_gemm(const GemmBackend& g) {
#if defined(__AVX512BF16__)
  return g.use_bf16;
#else
  return g.use_bf16 && g.bf16 != nullptr;
#endif
}

// The GEMM engine of one call: fp32 (own micro-kernel or an external sgemm) or bf16.
class Mm {
 public:
  // A packed (bf16) or plain (fp32) right-hand operand.
  struct B {
    const float* f;
    int64_t ldf;
    const uint32_t* packed;
    int64_t ldp;
  };

  Mm(const GemmBackend& g, bool bf16, uint16_t* a_buf) : g_(g), bf16_(bf16), a_buf_(a_buf) {}

  // B[K, N] (row stride ldb); in bf16 mode packed into `pack_buf` (>= ceil(K/2) * N words).
  B operand(const float* b, int64_t K, int64_t N, int64_t ldb, uint32_t* pack_buf) const {
    if (!bf16_) return B{b, ldb, nullptr, 0};
    pack_vnni_rows(b, K, N, ldb, pack_buf, N);
    return B{nullptr, 0, pack_buf, N};
  }

  // C[M, N] (+)= A[M, K] B[:K, :N]
  void run(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const B& b, float* C, int64_t ldc,
           bool accumulate) const {
    if (M <= 0 || N <= 0) return;
    if (!bf16_) {
      if (g_.f32) {
        g_.f32(M, N, K, A, lda, b.f, b.ldf, C, ldc, accumulate);
      } else {
        gemm_nn(M, N, K, A, lda, b.f, b.ldf, C, ldc, accumulate);
      }
      return;
    }
    const int64_t Ke = even(K);
    to_bf16_rows(A, M, K, lda, a_buf_, Ke);
    if (g_.bf16) {
      g_.bf16(M, N, K, a_buf_, Ke, b.packed, b.ldp, C, ldc, accumulate);
    } else {
#if defined(__AVX512BF16__)
      gemm_bf16(M, N, K, a_buf_, Ke, b.packed, b.ldp, C, ldc, accumulate);
#endif
    }
  }

  // C = A B for lower-triangular A[M, M] (zeros above the diagonal): row block [i0, i1) needs
  // only the first i1 rows of B.
  void run_lower_a(int64_t M, int64_t N, const float* A, int64_t lda, const B& b, float* C, int64_t ldc,
                   bool accumulate) const {
    if (g_.triangle_block == 0) return run(M, N, M, A, lda, b, C, ldc, accumulate);
    for (int64_t i0 = 0; i0 < M; i0 += g_.triangle_block) {
      const int64_t i1 = std::min(M, i0 + g_.triangle_block);
      run(i1 - i0, N, i1, A + i0 * lda, lda, b, C + i0 * ldc, ldc, accumulate);
    }
  }

  // The lower triangle (incl. diagonal) of C[M, M] = A B; entries right of each row block are
  // left unwritten.
  void run_lower_c(int64_t M, int64_t K, const float* A, int64_t lda, const B& b, float* C, int64_t ldc) const {
    if (g_.triangle_block == 0) return run(M, M, K, A, lda, b, C, ldc, false);
    for (int64_t i0 = 0; i0 < M; i0 += g_.triangle_block) {
      const int64_t i1 = std::min(M, i0 + g_.triangle_block);
      run(i1 - i0, i1, K, A + i0 * lda, lda, b, C + i0 * ldc, ldc, false);
    }
  }

 private:
  const GemmBackend& g_;
  bool bf16_;
  uint16_t* a_buf_;
};

}  // namespace GDN_ISA
}  // namespace gdn
