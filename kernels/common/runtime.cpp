#include "common/runtime.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cstdlib>
#include <memory>
#include <mutex>

#include "common/fp_env.h"
#include "common/parallel.h"
#include "common/gemm_backends.h"

namespace gdn {

#define GDN_DECLARE_ISA(name)        \
  namespace name {                   \
  const KernelTable& kernel_table(); \
  }
#if GDN_HAVE_ISA_AVX512_BF16
GDN_DECLARE_ISA(avx512_bf16)
#endif
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
bool cpu_has_avx512_bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif
bool always() { return true; }

// Rank of an ISA name in the cap order (higher = newer); -1 when unknown.
int isa_rank(const std::string& name) {
  static const char* const order[] = {"generic", "avx2", "avx512", "avx512_bf16", "amx"};
  for (int i = 0; i < 5; ++i)
    if (name == order[i]) return i;
  return -1;
}

// VLLM_GDN_CPU_MAX_ISA as a rank (no cap: amx's).
int max_isa_rank() {
  const char* v = std::getenv(kMaxIsaEnv);
  if (v == nullptr || *v == '\0') return isa_rank("amx");
  const int rank = isa_rank(v);
  TORCH_CHECK_VALUE(rank >= 0, kMaxIsaEnv, "=", v, " is not a known ISA; expected one of: generic, avx2, avx512, "
                    "avx512_bf16, amx");
  return rank;
}

bool amx_allowed() { return amx_usable() && max_isa_rank() >= isa_rank("amx"); }

const std::vector<IsaEntry>& compiled_isas() {
  static const std::vector<IsaEntry> isas = {
#if GDN_HAVE_ISA_AVX512_BF16
      {"avx512_bf16", &cpu_has_avx512_bf16, &avx512_bf16::kernel_table},
#endif
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

// The CPU runs this ISA and the cap (VLLM_GDN_CPU_MAX_ISA) admits it.
bool usable(const IsaEntry& e) { return e.cpu_supports() && isa_rank(e.name) <= max_isa_rank(); }

const IsaEntry* find_isa(const std::string& name) {
  for (const auto& e : compiled_isas())
    if (name == e.name) return &e;
  return nullptr;
}

std::string env_or_auto(const char* var) {
  const char* v = std::getenv(var);
  return (v && *v) ? v : "auto";
}

const KernelTable& resolve_isa(const std::string& want) {
  if (want == "auto") {
    for (const auto& e : compiled_isas())
      if (usable(e)) return e.table();
  }
  const IsaEntry* e = find_isa(want);
  std::vector<std::string> compiled;
  for (const auto& c : compiled_isas()) compiled.emplace_back(c.name);
  TORCH_CHECK_VALUE(e != nullptr, kIsaEnv, "=", want, " is not a known ISA; expected auto or one of: ",
                    c10::Join(", ", compiled));
  TORCH_CHECK_VALUE(usable(*e), kIsaEnv, "=", want, ": this CPU cannot run it (usable: ",
                    c10::Join(", ", available_isas()), ")");
  return e->table();
}

GemmChoice resolve_gemm(const std::string& want, const KernelTable& isa) {
  // Our own micro-kernels cost nothing per call: triangular products skip their zero triangle in
  // 16-row blocks.
  const GemmBackend own{nullptr, nullptr, nullptr, false, nullptr, 16};
  if (want == "auto") {
    // AMX where usable; otherwise our fp32 kernels. vdpbf16ps does not beat fp32 FMA in MACs per
    // cycle on the CPUs measured (Emerald Rapids Xeons), so bf16 products there only add
    // conversion work; the avx512_bf16 path stays available by name.
    if (amx_allowed()) return {&isa, amx_backend()};
    GemmBackend b = own;
    b.name = isa.has_bf16_gemm ? "avx512" : isa.isa;  // the fp32 kernel of that ISA is AVX-512's
    return {&isa, b};
  }
  if (want == "amx") {
    TORCH_CHECK_VALUE(amx_allowed(), kGemmEnv, "=amx: this CPU has no usable AMX-BF16 tiles (or this build "
                      "has no AMX kernel: compiler without -mamx-tile); usable: ", c10::Join(", ", available_gemms()));
    return {&isa, amx_backend()};
  }
  if (want == "torch") return {&isa, torch_backend()};
  if (want == "openblas") {
    TORCH_CHECK_VALUE(openblas_available(), kGemmEnv, "=openblas: this build was made without OpenBLAS "
                      "(install scipy-openblas32 before building); usable: ", c10::Join(", ", available_gemms()));
    return {&isa, openblas_backend()};
  }
  // The remaining names are our own per-ISA GEMM kernels: run that ISA's chunk kernel.
  const IsaEntry* e = find_isa(want);
  TORCH_CHECK_VALUE(e != nullptr, kGemmEnv, "=", want, " is not a known GEMM path; expected auto or one of: amx, "
                    "avx512_bf16, avx512, avx2, generic, openblas, torch");
  TORCH_CHECK_VALUE(usable(*e), kGemmEnv, "=", want, ": this CPU cannot run it (usable: ",
                    c10::Join(", ", available_gemms()), ")");
  GemmBackend b = own;
  b.name = e->name;
  b.use_bf16 = e->table().has_bf16_gemm;
  return {&e->table(), b};
}

// Resolution is cached per value of the variables, so tests can switch paths by setting them.
struct Cache {
  std::mutex mu;
  std::string isa_value = "\x01", gemm_value = "\x01";  // each prefixed with the cap's value
  const KernelTable* isa = nullptr;
  GemmChoice gemm{};
};
Cache& cache() {
  static Cache c;
  return c;
}

}  // namespace

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const auto& e : compiled_isas())
    if (usable(e)) out.emplace_back(e.name);
  return out;
}

std::vector<std::string> available_gemms() {
  std::vector<std::string> out;
  if (amx_allowed()) out.emplace_back("amx");
  for (const auto& isa : available_isas()) out.push_back(isa);
  if (openblas_available()) out.emplace_back("openblas");
  out.emplace_back("torch");
  return out;
}

const KernelTable& active_kernels() {
  Cache& c = cache();
  const std::string value = env_or_auto(kMaxIsaEnv) + "|" + env_or_auto(kIsaEnv);
  std::lock_guard<std::mutex> lock(c.mu);
  if (c.isa == nullptr || value != c.isa_value) {
    c.isa = &resolve_isa(env_or_auto(kIsaEnv));
    c.isa_value = value;
    c.gemm_value = "\x01";  // the GEMM choice depends on the ISA
  }
  return *c.isa;
}

GemmChoice active_gemm() {
  const KernelTable& isa = active_kernels();
  Cache& c = cache();
  const std::string value = env_or_auto(kMaxIsaEnv) + "|" + env_or_auto(kGemmEnv);
  std::lock_guard<std::mutex> lock(c.mu);
  if (value != c.gemm_value) {
    c.gemm = resolve_gemm(env_or_auto(kGemmEnv), isa);
    c.gemm_value = value;
  }
  return c.gemm;
}

void parallel_for_impl(int64_t n, int64_t grain, const void* ctx, RangeFn fn) {
  if (n <= 0) return;
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    const DenormalsFlushed flushed;  // each worker thread, for the duration of its share
    fn(ctx, b, e);
  });
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
