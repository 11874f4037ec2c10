// Run-time selection of the kernel ISA (host side, baseline ISA).
#pragma once
#include <string>
#include <vector>

#include "common/params.h"

namespace gdn {

// Environment variable that forces an ISA: auto | avx512 | avx2 | generic.
constexpr const char* kIsaEnv = "VLLM_GDN_CPU_ISA";

// ISAs compiled into this build that this CPU can run, best first.
std::vector<std::string> available_isas();
// The table chosen by VLLM_GDN_CPU_ISA (re-read whenever the variable changes); throws a
// ValueError-type c10::Error naming the variable for an unknown or unsupported value.
const KernelTable& active_kernels();

}  // namespace gdn
