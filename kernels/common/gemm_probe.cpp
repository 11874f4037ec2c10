// gemm_probe: not a GDN op but the benchmarks' measure of per-core compute. Every thread runs the
// prefill's GEMM engine on its own operands of the shape it is given (common/ops.cpp passes the chunk
// kernel's C[64, 128] = A[64, 128] B[128, 128]: ~100 KiB, resident in the core's L2) for a fixed
// time and reports its GFLOP/s. Run on one thread and then on all of them, it shows how much of a core's
// compute rate survives when every core computes (all-core clock, shared power budget): the
// ceiling of any compute-bound kernel's thread scaling, with memory taken out of the picture.
#include <chrono>
#include <vector>

#include "common/gemm_engine.h"
#include "common/parallel.h"

namespace gdn {
namespace GDN_ISA {

void gemm_probe(const GemmBackend& gemm, bool bf16, int64_t M, int64_t N, int64_t K, double seconds,
                double* gflops_per_thread) {
  constexpr int64_t kCallsPerCheck = 64;
  const bool use_bf16 = bf16 && has_bf16_gemm(gemm);
  const int64_t threads = num_threads();
  parallel_for(threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      std::vector<float> A(M * K), B(K * N), C(M * N);
      for (int64_t i = 0; i < M * K; ++i) A[i] = static_cast<float>((i * 7 + task) % 13) * 0.01f;
      for (int64_t i = 0; i < K * N; ++i) B[i] = static_cast<float>((i * 5 + task) % 11) * 0.01f;
      std::vector<uint16_t> a_buf(M * even(K));
      std::vector<uint32_t> packed(even(K) / 2 * N);
      const Mm mm(gemm, use_bf16, a_buf.data());
      const Mm::B b = mm.operand(B.data(), K, N, N, packed.data());
      const auto start = std::chrono::steady_clock::now();
      int64_t calls = 0;
      double elapsed = 0;
      do {
        for (int64_t c = 0; c < kCallsPerCheck; ++c) mm.run(M, N, K, A.data(), K, b, C.data(), N, c > 0);
        calls += kCallsPerCheck;
        elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      } while (elapsed < seconds);
      gflops_per_thread[task] = 2.0 * M * N * K * calls / elapsed / 1e9;
    }
    if (gemm.release) gemm.release();
  });
}

}  // namespace GDN_ISA
}  // namespace gdn
