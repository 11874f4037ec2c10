// GEMM engines outside the per-ISA kernels (see gemm_backends.cpp).
#pragma once
#include "common/params.h"

#ifndef GDN_HAS_OPENBLAS
#define GDN_HAS_OPENBLAS 0
#endif

namespace gdn {

bool amx_usable();          // AMX-BF16 tiles present, enabled by the OS, and oneDNN brgemm usable
bool openblas_available();  // built against OpenBLAS

GemmBackend torch_backend();
GemmBackend openblas_backend();
GemmBackend amx_backend();

}  // namespace gdn
