// Run-time selection of the kernel ISA and of the prefill GEMM engine (host side, baseline ISA).
#pragma once
#include <string>
#include <vector>

#include "common/params.h"

namespace gdn {

// Forces the vector ISA of all kernels: auto | avx512_bf16 | avx512 | avx2 | generic.
constexpr const char* kIsaEnv = "VLLM_GDN_CPU_ISA";
// Caps what this CPU is taken to support: avx512_bf16 | avx512 | avx2 | generic (amx or unset: no
// cap). For tests that emulate an older CPU on a newer one (with torch's ATEN_CPU_CAPABILITY and
// oneDNN's ONEDNN_MAX_CPU_ISA): ISAs and GEMM engines above the cap are reported unavailable.
constexpr const char* kMaxIsaEnv = "VLLM_GDN_CPU_MAX_ISA";
// Forces the GEMM engine of the chunked prefill:
//   auto | amx | avx512_bf16 | avx512 | avx2 | generic | openblas | torch.
constexpr const char* kGemmEnv = "VLLM_GDN_CPU_GEMM";

// ISAs compiled into this build that this CPU can run, best first.
std::vector<std::string> available_isas();
// GEMM engines this build and CPU can run, best first.
std::vector<std::string> available_gemms();

// The kernels of the ISA chosen by VLLM_GDN_CPU_ISA (re-read whenever the variable changes).
const KernelTable& active_kernels();

// The prefill's GEMM engine (VLLM_GDN_CPU_GEMM) and the kernel table whose chunk kernel runs it.
struct GemmChoice {
  const KernelTable* kernels;
  GemmBackend backend;
};
GemmChoice active_gemm();

}  // namespace gdn
