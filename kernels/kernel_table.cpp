// This ISA's entry in the run-time kernel table, generated from GDN_KERNEL_LIST (kernels/kernel_list.h).
#include "common/params.h"

namespace gdn {
namespace GDN_ISA {

#define GDN_KERNEL_DECLARE(name, ...) void name(__VA_ARGS__);
GDN_KERNEL_LIST(GDN_KERNEL_DECLARE)
#undef GDN_KERNEL_DECLARE

#define GDN_STR2(x) #x
#define GDN_STR(x) GDN_STR2(x)
const KernelTable& kernel_table() {
#if defined(__AVX512BF16__)
  constexpr bool kHasBF16Gemm = true;
#else
  constexpr bool kHasBF16Gemm = false;
#endif
#define GDN_KERNEL_ENTRY(name, ...) &name,
  static const KernelTable table{GDN_STR(GDN_ISA), kHasBF16Gemm, GDN_KERNEL_LIST(GDN_KERNEL_ENTRY)};
#undef GDN_KERNEL_ENTRY
  return table;
}

}  // namespace GDN_ISA
}  // namespace gdn
