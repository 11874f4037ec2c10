// Host entry points of the small-batch linear engine (small_linear, the linear dispatcher and its
// path counters) and of the gated RMSNorm: argument checks, then the active ISA's kernel.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/runtime.h"
#include "ops.h"

namespace gdn {
namespace {

constexpr const char* kLinearMaxMEnv = "VLLM_GDN_CPU_LINEAR_MAX_M";

// Default token counts up to which linear() runs our kernel rather than torch's GEMM (at::linear:
// oneDNN/MKL), per weight dtype. Provisional (first measurements: ours ahead of torch's F.linear at
// M = 4 and 16 on fp32 weights, one thread, cold weights); the crossover is measured with
// `python -m vllm_gdn_cpu.tools.bench gemv --ms ...` (see docs/performance.md).
constexpr int64_t kDefaultMaxM_F32 = 16;
constexpr int64_t kDefaultMaxM_BF16 = 16;
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
    case at::kBFloat16: return kDefaultMaxM_BF16;
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

void run_small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      at::Tensor& out, const LinearShape& s) {
  if (s.M == 0 || s.N == 0) return;
  const at::Tensor x32 = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
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
