#include "runtime.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <memory>
#include <mutex>

#include "common/parallel.h"

namespace gdn {

#define GDN_DECLARE_ISA(name) \
  namespace name {            \
  const KernelTable& kernel_table(); \
  }
#if GDN_HAVE_ISA_AVX512
GDN_DECLARE_ISA(avx512)
#endif
#if GDN_HAVE_ISA_AVX2
GDN_DECLARE_ISA(avx2)
#endif
GDN_DECLARE_ISA(generic)

namespace {

struct IsaEntry {
  const char* name;
  bool (*cpu_supports)();
  const KernelTable& (*table)();
};

#if defined(__x86_64__)
bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif
bool always() { return true; }

const std::vector<IsaEntry>& compiled_isas() {
  static const std::vector<IsaEntry> isas = {
#if GDN_HAVE_ISA_AVX512
      {"avx512", &cpu_has_avx512, &avx512::kernel_table},
#endif
#if GDN_HAVE_ISA_AVX2
      {"avx2", &cpu_has_avx2, &avx2::kernel_table},
#endif
      {"generic", &always, &generic::kernel_table},
  };
  return isas;
}

const KernelTable& resolve(const std::string& want) {
  std::string compiled;
  for (const auto& e : compiled_isas()) {
    compiled += std::string(compiled.empty() ? "" : ", ") + e.name;
    if (want == "auto" && e.cpu_supports()) return e.table();
    if (want == e.name) {
      TORCH_CHECK_VALUE(e.cpu_supports(), kIsaEnv, "=", want, ": this CPU does not support that ISA (usable: ",
                        c10::Join(", ", available_isas()), ")");
      return e.table();
    }
  }
  TORCH_CHECK_VALUE(false, kIsaEnv, "=", want, " is not a known ISA; expected auto or one of: ", compiled);
}

}  // namespace

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const auto& e : compiled_isas())
    if (e.cpu_supports()) out.emplace_back(e.name);
  return out;
}

const KernelTable& active_kernels() {
  // Cached per value of the variable, so tests can switch paths by setting it.
  static std::mutex mu;
  static std::string cached_value = "\x01";
  static const KernelTable* cached = nullptr;
  const char* env = std::getenv(kIsaEnv);
  const std::string value = (env && *env) ? env : "auto";
  std::lock_guard<std::mutex> lock(mu);
  if (cached == nullptr || value != cached_value) {
    cached = &resolve(value);
    cached_value = value;
  }
  return *cached;
}

void parallel_for_impl(int64_t n, int64_t grain, const void* ctx, RangeFn fn) {
  if (n <= 0) return;
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(ctx, b, e); });
}

int num_threads() { return at::get_num_threads(); }

float* thread_scratch(size_t num_floats) {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<float, Free> buffer;
  thread_local size_t capacity = 0;
  if (num_floats > capacity) {
    const size_t bytes = (num_floats * sizeof(float) + 63) / 64 * 64;
    float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(p != nullptr, "vllm_gdn_cpu: out of memory allocating ", bytes, " bytes of kernel scratch");
    buffer.reset(p);
    capacity = num_floats;
  }
  return buffer.get();
}

}  // namespace gdn
