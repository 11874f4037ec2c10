// Host entry points of the small-batch linear engine (small_linear, the linear dispatcher and its
// path counters) and of the gated RMSNorm: argument checks, then the active ISA's kernel.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/gemm_backends.h"
#include "common/parallel.h"
#include "common/runtime.h"
#include "common/op_registration.h"

namespace gdn {
namespace {

constexpr const char* kLinearMaxMEnv = "VLLM_GDN_CPU_LINEAR_MAX_M";

// Default token counts up to which linear() runs our kernel rather than torch's GEMM (at::linear:
// oneDNN/MKL, what linear() runs above it), per weight dtype: the largest M at which ours was at least
// as fast as torch's F.linear on all three GDN projection shapes ([12352, 1024] qkvz+ba, [1024, 4096]
// out_proj, [64, 1024] ba), weights cold (pool > 3x LLC), measured on the 2-core Xeon (AMX) with 1
// thread by CPU time and 2 threads by wall time, and with the AVX2 caps (VLLM_GDN_CPU_MAX_ISA=avx2,
// ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), M in {1, 4, 8, 16, 24, 32, 48}:
// - fp32: AVX-512 ahead of torch up to 48 (1.7-1.9x at 16; vLLM's onednn_mm level at 16, ahead
//   below, 5-15% ahead of ours at 24-48), AVX2 level at 32 and behind at 48: 32.
// - bf16 with our AMX path (bf16 x): level with torch's AMX GEMM at 16, behind at 24: 16. Without
//   AMX (AVX2 caps), torch's bf16 GEMM is emulated and ours stays 2.6-3x ahead at 48: 48.
// - fp16: ahead at 16, behind at 32 on two shapes (torch uses AVX512-FP16 here): 16.
constexpr int64_t kDefaultMaxM_F32 = 32;
constexpr int64_t kDefaultMaxM_BF16_AMX = 16;
constexpr int64_t kDefaultMaxM_BF16 = 48;
constexpr int64_t kDefaultMaxM_F16 = 16;

std::atomic<int64_t> g_small_calls{0}, g_large_calls{0};

int64_t linear_max_m(at::ScalarType weight_dtype) {
  const char* v = std::getenv(kLinearMaxMEnv);
  if (v != nullptr && *v != '\0') {
    char* end = nullptr;
    errno = 0;
    const long long m = std::strtoll(v, &end, 10);
    TORCH_CHECK_VALUE(errno == 0 && end != v && *end == '\0' && m >= 0, kLinearMaxMEnv, "=", v,
                      " is not a non-negative integer (0: never our kernel)");
    return m;
  }
  switch (weight_dtype) {
    case at::kBFloat16:
      return std::string(active_gemm().backend.name) == "amx" ? kDefaultMaxM_BF16_AMX : kDefaultMaxM_BF16;
    case at::kHalf: return kDefaultMaxM_F16;
    default: return kDefaultMaxM_F32;
  }
}

struct LinearShape {
  int64_t M, N, K;
};

LinearShape check_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const char* op) {
  check_dim(x, 2, op, "x", "[M, K]");
  to_dtype(x, op, "x");
  check_last_dim_contiguous(x, op, "x");
  check_dim(weight, 2, op, "weight", "[N, K]");
  to_dtype(weight, op, "weight");
  TORCH_CHECK_VALUE(weight.is_contiguous(), op, ": argument 'weight' must be contiguous (plain row-major [N, K]), "
                    "got strides ", weight.strides(), " for shape ", weight.sizes());
  const LinearShape s{x.size(0), weight.size(0), x.size(1)};
  TORCH_CHECK_VALUE(weight.size(1) == s.K, op, ": argument 'weight' must have K=", s.K,
                    " columns (x's last dim), got shape ", weight.sizes());
  if (bias.has_value()) {
    check_dim(*bias, 1, op, "bias", "[N]");
    to_dtype(*bias, op, "bias");
    TORCH_CHECK_VALUE(bias->size(0) == s.N, op, ": argument 'bias' must have N=", s.N,
                      " entries (weight's rows), got shape ", bias->sizes());
  }
  return s;
}

void check_no_overlap(const at::Tensor& out, const at::Tensor& other, const char* op, const char* out_name,
                      const char* other_name, bool allow_full) {
  // Different storages never overlap (get_overlap_status answers "too hard" for strided views,
  // such as z sliced out of a projection's output, even against a fresh tensor).
  if (!out.is_alias_of(other)) return;
  const auto status = at::get_overlap_status(out, other);
  const bool ok = status == at::MemOverlapStatus::No || (allow_full && status == at::MemOverlapStatus::Full);
  TORCH_CHECK_VALUE(ok, op, ": argument '", out_name, "' must not overlap argument '", other_name, "'",
                    allow_full ? " (other than being the same tensor)" : "");
}

#if GDN_HAVE_AMX_TILES
// bf16 x and bf16 weight on AMX tiles: out^T[N, G] = weight[N, K] (the tiles' A operand, read in
// place with row stride K) x^T[K, G] (x packed once into bf16 pairs along K, G = 16 or 32 token
// columns, zero padded), fp32 accumulation; each thread runs its row range and writes its columns
// of out (+ bias, one rounding). The products of bf16 values are exact in fp32, as in the vector
// path; the tiles flush bf16 subnormal inputs to zero. The vector kernel's compute at M = 16 on
// bf16 weights (a conversion per weight per 4 tokens) ran at half of the weight stream; the tiles
// leave it memory-bound.
void amx_linear(const at::Tensor& x, const at::Tensor& weight, const float* bias, at::Tensor& out,
                const LinearShape& s) {
  const int64_t K2 = s.K / 2, N = s.N;
  const uint16_t* W = static_cast<const uint16_t*>(weight.data_ptr());
  const uint16_t* xb = static_cast<const uint16_t*>(x.data_ptr());
  for (int64_t m0 = 0; m0 < s.M; m0 += 32) {
    const int64_t mt = std::min<int64_t>(32, s.M - m0), G = mt <= 16 ? 16 : 32;
    std::vector<uint32_t> B(K2 * G, 0);
    for (int64_t m = 0; m < mt; ++m) {
      const uint16_t* row = xb + (m0 + m) * x.stride(0);
      for (int64_t p = 0; p < K2; ++p) B[p * G + m] = row[2 * p] | (static_cast<uint32_t>(row[2 * p + 1]) << 16);
    }
    constexpr int64_t kRowBlock = 32;  // two tile rows
    const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
    const int64_t grain = std::max<int64_t>(1, (64 << 10) / (kRowBlock * s.K * 2));
    parallel_for(blocks, grain, [&](int64_t b0, int64_t b1) {
      const int64_t r0 = b0 * kRowBlock, rows = std::min(N, b1 * kRowBlock) - r0;
      float* C = thread_scratch(static_cast<size_t>(rows) * G);
      amx_tile_gemm_bf16(rows, G, s.K, W + r0 * s.K, s.K, B.data(), G, C, G, false);
      amx_tile_release();
      for (int64_t m = 0; m < mt; ++m) {
        const int64_t o = (m0 + m) * out.stride(0) + r0;
        for (int64_t i = 0; i < rows; ++i) {
          const float v = C[i * G + m] + (bias ? bias[r0 + i] : 0.f);
          switch (out.scalar_type()) {
            case at::kBFloat16: static_cast<at::BFloat16*>(out.data_ptr())[o + i] = static_cast<at::BFloat16>(v); break;
            case at::kHalf: static_cast<at::Half*>(out.data_ptr())[o + i] = static_cast<at::Half>(v); break;
            default: static_cast<float*>(out.data_ptr())[o + i] = v; break;
          }
        }
      }
    });
  }
}
#endif

// Whether small_linear takes the AMX tiles: bf16 x and weight, even K, M of at least 2 (one
// token streams at the same rate on the vector kernel), and the AMX engine chosen for this CPU
// (VLLM_GDN_CPU_GEMM auto/amx) with the avx512_bf16 kernels (forcing another ISA or GEMM engine
// runs the vector kernel of that ISA instead).
bool use_amx(const at::Tensor& x, const at::Tensor& weight, const LinearShape& s) {
#if GDN_HAVE_AMX_TILES
  return x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && s.K % 2 == 0 && s.K > 0 &&
         s.M >= 2 && std::string(active_kernels().isa) == "avx512_bf16" &&
         std::string(active_gemm().backend.name) == "amx";
#else
  (void)x, (void)weight, (void)s;
  return false;
#endif
}

void run_small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      at::Tensor& out, const LinearShape& s) {
  if (s.M == 0 || s.N == 0) return;
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
#if GDN_HAVE_AMX_TILES
  if (use_amx(x, weight, s)) return amx_linear(x, weight, bias.has_value() ? b32.data_ptr<float>() : nullptr, out, s);
#endif
  const at::Tensor x32 = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  LinearParams p{};
  p.M = s.M, p.N = s.N, p.K = s.K;
  p.x = x32.data_ptr<float>();
  p.x_stride = x32.stride(0);
  p.weight = weight.data_ptr();
  p.weight_dtype = to_dtype(weight, "small_linear", "weight");
  p.bias = bias.has_value() ? b32.data_ptr<float>() : nullptr;
  p.out = mat2(out, "small_linear", "out");
  active_kernels().linear(p);
}

// Leading dims (all but the last) of t as at most two levels of (count, stride); false when the
// layout needs more.
bool collapse_rows(const at::Tensor& t, RowSet& rs) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // outer to inner
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) == 1) continue;
    if (!dims.empty() && dims.back().second == t.stride(d) * t.size(d)) {
      dims.back() = {dims.back().first * t.size(d), t.stride(d)};
    } else {
      dims.emplace_back(t.size(d), t.stride(d));
    }
  }
  if (dims.size() > 2) return false;
  rs.data = t.data_ptr();
  rs.inner = 1, rs.outer_stride = 0, rs.inner_stride = 0;
  if (dims.size() == 1) rs.inner = dims[0].first, rs.inner_stride = dims[0].second;
  if (dims.size() == 2) rs.inner = dims[1].first, rs.inner_stride = dims[1].second, rs.outer_stride = dims[0].second;
  return true;
}

}  // namespace

void small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::Tensor& out) {
  constexpr const char* op = "small_linear";
  const LinearShape s = check_linear_args(x, weight, bias, op);
  check_dim(out, 2, op, "out", "[M, N]");
  check_shape(out, {s.M, s.N}, op, "out");
  to_dtype(out, op, "out");
  check_last_dim_contiguous(out, op, "out");
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
                    ": argument 'out' must not have overlapping elements (e.g. an expanded tensor)");
  check_no_overlap(out, x, op, "out", "x", false);
  check_no_overlap(out, weight, op, "out", "weight", false);
  if (bias.has_value()) check_no_overlap(out, *bias, op, "out", "bias", false);
  run_small_linear(x, weight, bias, out, s);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "linear";
  const LinearShape s = check_linear_args(x, weight, bias, op);
  if (s.M <= linear_max_m(weight.scalar_type())) {
    g_small_calls.fetch_add(1, std::memory_order_relaxed);
    at::Tensor out = at::empty({s.M, s.N}, x.options());
    run_small_linear(x, weight, bias, out, s);
    return out;
  }
  g_large_calls.fetch_add(1, std::memory_order_relaxed);
  if (x.scalar_type() == weight.scalar_type()) {
    if (!bias.has_value() || bias->scalar_type() == x.scalar_type()) return at::linear(x, weight, bias);
    return at::linear(x, weight, bias->to(x.scalar_type()));
  }
  // Mixed dtypes (torch's GEMM takes one): x in the weight's dtype, as F.linear on x.to(weight.dtype)
  // would compute, the result back in x's dtype. Converting the (large) weight instead would copy it.
  const at::Tensor xw = x.to(weight.scalar_type());
  const std::optional<at::Tensor> bw =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(weight.scalar_type())) : std::nullopt;
  return at::linear(xw, weight, bw).to(x.scalar_type());
}

// int8 weight-only GEMM (weight int8 [N, K] with fp32 per-row scales, x fp32/bf16/fp16): our kernel
// up to the token count of linear_max_m (VLLM_GDN_CPU_LINEAR_MAX_M, else kDefaultMaxM_Int8), else
// torch's GEMM on the weight dequantized to x's dtype for the call.
constexpr int64_t kDefaultMaxM_Int8 = 32;

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                       const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "linear_int8";
  check_dim(x, 2, op, "x", "[M, K]");
  to_dtype(x, op, "x");
  check_last_dim_contiguous(x, op, "x");
  check_dim(weight, 2, op, "weight", "[N, K]");
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kChar, op, ": argument 'weight' must be int8, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.is_contiguous(), op, ": argument 'weight' must be contiguous (plain row-major [N, K]), "
                    "got strides ", weight.strides(), " for shape ", weight.sizes());
  const LinearShape s{x.size(0), weight.size(0), x.size(1)};
  TORCH_CHECK_VALUE(weight.size(1) == s.K, op, ": argument 'weight' must have K=", s.K,
                    " columns (x's last dim), got shape ", weight.sizes());
  check_cpu(weight_scale, op, "weight_scale");
  TORCH_CHECK_VALUE(weight_scale.numel() == s.N && (weight_scale.dim() == 1 || weight_scale.dim() == 2),
                    op, ": argument 'weight_scale' must be [N] or [N, 1] with N=", s.N, " (one scale per weight row), got shape ",
                    weight_scale.sizes());
  TORCH_CHECK_TYPE(weight_scale.scalar_type() == at::kFloat, op, ": argument 'weight_scale' must be float32, got ",
                   weight_scale.scalar_type());
  if (bias.has_value()) {
    check_dim(*bias, 1, op, "bias", "[N]");
    to_dtype(*bias, op, "bias");
    TORCH_CHECK_VALUE(bias->size(0) == s.N, op, ": argument 'bias' must have N=", s.N,
                      " entries (weight's rows), got shape ", bias->sizes());
  }
  const at::Tensor scale = weight_scale.reshape({s.N}).contiguous();
  const char* env = std::getenv(kLinearMaxMEnv);
  const int64_t max_m = env != nullptr && *env != '\0' ? linear_max_m(at::kChar) : kDefaultMaxM_Int8;
  if (s.M > max_m) {
    g_large_calls.fetch_add(1, std::memory_order_relaxed);
    const at::Tensor w = (weight.to(at::kFloat) * scale.unsqueeze(1)).to(x.scalar_type());
    return at::linear(x, w, bias.has_value() ? std::optional<at::Tensor>(bias->to(x.scalar_type())) : std::nullopt);
  }
  g_small_calls.fetch_add(1, std::memory_order_relaxed);
  at::Tensor out = at::empty({s.M, s.N}, x.options());
  if (s.M == 0 || s.N == 0) return out;
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  const at::Tensor x32 = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  LinearParams p{};
  p.M = s.M, p.N = s.N, p.K = s.K;
  p.x = x32.data_ptr<float>();
  p.x_stride = x32.stride(0);
  p.weight = weight.data_ptr();
  p.weight_dtype = DType::kFloat32;  // ignored: weight_scale marks int8 weights
  p.weight_scale = scale.data_ptr<float>();
  p.bias = bias.has_value() ? b32.data_ptr<float>() : nullptr;
  p.out = mat2(out, op, "out");
  active_kernels().linear(p);
  return out;
}

std::vector<int64_t> linear_path_counts() {
  return {g_small_calls.load(std::memory_order_relaxed), g_large_calls.load(std::memory_order_relaxed)};
}

void reset_linear_path_counts() {
  g_small_calls.store(0, std::memory_order_relaxed);
  g_large_calls.store(0, std::memory_order_relaxed);
}

void gated_rms_norm(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight, double eps, bool sigmoid,
                    at::Tensor& out) {
  constexpr const char* op = "gated_rms_norm";
  check_cpu(x, op, "x");
  check_cpu(z, op, "z");
  check_cpu(out, op, "out");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": argument 'x' must have at least one dim [..., D], got a scalar");
  const DType dtype = to_dtype(x, op, "x");
  check_shape(z, x.sizes(), op, "z");
  check_shape(out, x.sizes(), op, "out");
  TORCH_CHECK_TYPE(z.scalar_type() == x.scalar_type(), op, ": argument 'z' must have x's dtype ", x.scalar_type(),
                   ", got ", z.scalar_type());
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), op, ": argument 'out' must have x's dtype ",
                   x.scalar_type(), ", got ", out.scalar_type());
  const int64_t D = x.size(-1);
  check_dim(weight, 1, op, "weight", "[D]");
  check_shape(weight, {D}, op, "weight");
  to_dtype(weight, op, "weight");
  check_finite(eps, op, "eps");
  TORCH_CHECK_VALUE(eps >= 0, op, ": argument 'eps' must be >= 0, got ", eps);
  check_last_dim_contiguous(x, op, "x");
  check_last_dim_contiguous(z, op, "z");
  check_last_dim_contiguous(out, op, "out");
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
                    ": argument 'out' must not have overlapping elements (e.g. an expanded tensor)");
  // Each element is read before its own output is written: out may be x or z itself, not part of them.
  check_no_overlap(out, x, op, "out", "x", true);
  check_no_overlap(out, z, op, "out", "z", true);
  check_no_overlap(out, weight, op, "out", "weight", false);
  if (x.numel() == 0) return;
  const at::Tensor w32 = weight.to(at::kFloat).contiguous();
  GatedRmsNormParams p{};
  p.D = D;
  p.rows = x.numel() / D;
  p.dtype = dtype;
  p.weight = w32.data_ptr<float>();
  p.eps = static_cast<float>(eps);
  p.sigmoid = sigmoid;
  // Layouts whose leading dims do not collapse to two levels go through contiguous copies.
  const at::Tensor xc = collapse_rows(x, p.x) ? x : x.contiguous();
  if (!xc.is_same(x)) collapse_rows(xc, p.x);
  const at::Tensor zc = collapse_rows(z, p.z) ? z : z.contiguous();
  if (!zc.is_same(z)) collapse_rows(zc, p.z);
  at::Tensor oc = collapse_rows(out, p.out) ? out : at::empty(out.sizes(), out.options());
  if (!oc.is_same(out)) collapse_rows(oc, p.out);
  active_kernels().gated_rms_norm(p);
  if (!oc.is_same(out)) out.copy_(oc);
}

}  // namespace gdn

TORCH_LIBRARY_FRAGMENT(vllm_gdn_cpu, m) {
  gdn::def_cpu_op<&gdn::small_linear>(m,
      "small_linear(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out) -> ()");
  gdn::def_cpu_op<&gdn::linear>(m, "linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  gdn::def_cpu_op<&gdn::linear_int8>(
      m, "linear_int8(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor");
  gdn::def_plain_op<&gdn::linear_path_counts>(m, "linear_path_counts() -> int[]");
  gdn::def_plain_op<&gdn::reset_linear_path_counts>(m, "reset_linear_path_counts() -> ()");
  gdn::def_cpu_op<&gdn::gated_rms_norm>(m,
      "gated_rms_norm(Tensor x, Tensor z, Tensor weight, float eps, bool sigmoid, Tensor(a!) out) -> ()");
}
