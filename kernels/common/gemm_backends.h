// GEMM engines outside the per-ISA kernels (see gemm_backends.cpp).
#pragma once
#include "common/params.h"

#ifndef GDN_HAS_OPENBLAS
#define GDN_HAS_OPENBLAS 0
#endif

namespace gdn {

bool amx_usable();          // AMX-BF16 tiles present, enabled by the OS, and our tile kernel built
bool openblas_available();  // built against OpenBLAS

#if GDN_HAVE_AMX_TILES
// kernels/common/amx_gemm.cpp: GemmBF16Fn on AMX tiles; the release frees this thread's tile state.
void amx_tile_gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint32_t* B,
                        int64_t ldb, float* C, int64_t ldc, bool accumulate);
void amx_tile_release();
#endif

GemmBackend torch_backend();
GemmBackend openblas_backend();
GemmBackend amx_backend();

}  // namespace gdn
