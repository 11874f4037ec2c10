// GEMM engines that live outside our per-ISA kernels (baseline ISA, may include ATen):
//   torch    - the BLAS libtorch is built with (its exported sgemm_), always available
//   openblas - cblas_sgemm of the OpenBLAS found at build time (GDN_HAS_OPENBLAS)
//   amx      - our AMX tile kernel (amx_gemm.cpp), on CPUs that have AMX-BF16
// Each is called per small GEMM from inside our parallel region, so they must run single-threaded.
#include "common/gemm_backends.h"

#include <ATen/cpu/Utils.h>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#if GDN_HAS_OPENBLAS
// scipy-openblas32 (the OpenBLAS CMake finds) prefixes its symbols; CblasRowMajor = 101,
// CblasNoTrans = 111.
#define GDN_OPENBLAS_SYMBOL(name) scipy_##name
extern "C" {
void GDN_OPENBLAS_SYMBOL(cblas_sgemm)(int order, int transa, int transb, int M, int N, int K, float alpha,
                                      const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc);
void GDN_OPENBLAS_SYMBOL(openblas_set_num_threads)(int n);
}
#endif

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace gdn {
namespace {

// Row-major C = A B (+ C) through column-major BLAS: C^T = B^T A^T, with the Fortran sgemm that
// libtorch_cpu is built with and exports (MKL in x86 wheels): the BLAS behind torch.mm.
void torch_sgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  const char no = 'N';
  sgemm_(&no, &no, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

#if GDN_HAS_OPENBLAS
void openblas_sgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    float* C, int64_t ldc, bool accumulate) {
  GDN_OPENBLAS_SYMBOL(cblas_sgemm)(101, 111, 111, M, N, K, 1.f, A, lda, B, ldb, accumulate ? 1.f : 0.f, C, ldc);
}
#endif

bool cpu_has_amx_bf16() {
#if defined(__x86_64__)
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
  return amx_bf16 && amx_tile;
#else
  return false;
#endif
}

}  // namespace

bool amx_usable() {
#if GDN_HAVE_AMX_TILES
  // init_amx asks the kernel for permission to use the tile state (arch_prctl), once per process.
  static const bool usable = cpu_has_amx_bf16() && at::cpu::init_amx();
  return usable;
#else
  return false;
#endif
}

bool openblas_available() { return GDN_HAS_OPENBLAS; }

GemmBackend torch_backend() { return GemmBackend{"torch", &torch_sgemm, nullptr, false, nullptr, 0}; }

#if GDN_HAS_OPENBLAS
// OpenBLAS starts a thread pool when it is loaded, i.e. when this extension is; we call it from
// inside our own parallel region, so its threads would only compete with ours for cores.
const bool kOpenblasSingleThreaded = (GDN_OPENBLAS_SYMBOL(openblas_set_num_threads)(1), true);
#endif

GemmBackend openblas_backend() {
#if GDN_HAS_OPENBLAS
  return GemmBackend{"openblas", &openblas_sgemm, nullptr, false, nullptr, 0};
#else
  return GemmBackend{"openblas", nullptr, nullptr, false, nullptr, 0};
#endif
}

GemmBackend amx_backend() {
#if GDN_HAVE_AMX_TILES
  return GemmBackend{"amx", nullptr, &amx_tile_gemm_bf16, true, &amx_tile_release, 32};
#else
  return GemmBackend{"amx", nullptr, nullptr, true, nullptr, 0};
#endif
}

}  // namespace gdn
