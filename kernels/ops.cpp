// Argument checking for every op: each failure names the op, the argument and what was expected,
// and surfaces in Python as ValueError / TypeError / IndexError. Only then are the checked tensors
// described to the ISA kernels as plain structs.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <vector>

#include "common/params.h"
#include "runtime.h"

namespace gdn {
namespace {

DType to_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": argument '", name, "' must be float32, bfloat16 or float16, got ",
                       t.scalar_type());
  }
  return DType::kFloat32;
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": argument '", name, "' must be a CPU tensor, got ", t.device());
}

void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* layout) {
  check_cpu(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": argument '", name, "' must be ", dim, "-D ", layout, ", got shape ",
                    t.sizes());
}

void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == want, op, ": argument '", name, "' must have shape ", want, ", got ", t.sizes());
}

void check_last_dim_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": argument '", name,
                    "' must be contiguous in its last dim, got strides ", t.strides());
}

Mat3 mat3(const at::Tensor& t, const char* op, const char* name) {
  check_last_dim_contiguous(t, op, name);
  return Mat3{t.data_ptr(), to_dtype(t, op, name), t.stride(0), t.stride(1)};
}

Mat2 mat2(const at::Tensor& t, const char* op, const char* name) {
  check_last_dim_contiguous(t, op, name);
  return Mat2{t.data_ptr(), to_dtype(t, op, name), t.stride(0)};
}

// q, k [T, Hk, K] and v [T, Hv, V] of one float dtype; Hv a multiple of Hk.
struct QKVShape {
  int64_t T, Hk, Hv, K, V;
};
QKVShape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  check_dim(q, 3, op, "q", "[T, Hk, K]");
  check_dim(k, 3, op, "k", "[T, Hk, K]");
  check_dim(v, 3, op, "v", "[T, Hv, V]");
  check_shape(k, q.sizes(), op, "k");
  QKVShape s{q.size(0), q.size(1), v.size(1), q.size(2), v.size(2)};
  TORCH_CHECK_VALUE(v.size(0) == s.T, op, ": argument 'v' must have T=", s.T, " tokens like q, got shape ",
                    v.sizes());
  TORCH_CHECK_VALUE(s.Hk > 0 && s.K > 0 && s.V > 0, op, ": argument 'q'/'v' must have non-empty heads, got q ",
                    q.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(s.Hv % s.Hk == 0, op, ": argument 'v' must have a number of heads (", s.Hv,
                    ") that is a multiple of q/k's (", s.Hk, ")");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": arguments 'q', 'k', 'v' must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
                   ", ", v.scalar_type());
  to_dtype(q, op, "q");
  return s;
}

void check_out(const at::Tensor& out, const at::Tensor& q, const QKVShape& s, const char* op) {
  check_dim(out, 3, op, "out", "[T, Hv, V]");
  check_shape(out, {s.T, s.Hv, s.V}, op, "out");
  TORCH_CHECK_TYPE(out.scalar_type() == q.scalar_type(), op, ": argument 'out' must have q's dtype ",
                   q.scalar_type(), ", got ", out.scalar_type());
}

StatePool check_state(const at::Tensor& state, const QKVShape& s, const char* op) {
  check_dim(state, 4, op, "state", "[num_slots, Hv, K, V]");
  TORCH_CHECK_VALUE(state.size(1) == s.Hv && state.size(2) == s.K && state.size(3) == s.V, op,
                    ": argument 'state' must have shape [num_slots, ", s.Hv, ", ", s.K, ", ", s.V, "], got ",
                    state.sizes());
  TORCH_CHECK_VALUE(state.stride(3) == 1 && state.stride(2) == s.V && state.stride(1) == s.K * s.V, op,
                    ": argument 'state' must be contiguous within each slot, got strides ", state.strides());
  return StatePool{state.data_ptr(), to_dtype(state, op, "state"), state.stride(0), state.size(0)};
}

// Slot indices: int32 [N], each < num_slots, non-negative ones distinct (two sequences writing one
// slot in one call would race). Negative entries are padding.
const int32_t* check_state_indices(const at::Tensor& idx, int64_t num_slots, const char* op) {
  check_dim(idx, 1, op, "state_indices", "[N]");
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt, op, ": argument 'state_indices' must be int32, got ",
                   idx.scalar_type());
  TORCH_CHECK_VALUE(idx.is_contiguous(), op, ": argument 'state_indices' must be contiguous");
  const int32_t* p = idx.data_ptr<int32_t>();
  const int64_t n = idx.size(0);
  std::vector<int32_t> used;
  used.reserve(n);
  for (const auto i : c10::irange(n)) {
    TORCH_CHECK_INDEX(p[i] < num_slots, op, ": argument 'state_indices' has ", p[i], " at position ", i,
                      ", out of range for a state pool of ", num_slots, " slots");
    if (p[i] >= 0) used.push_back(p[i]);
  }
  std::sort(used.begin(), used.end());
  const auto dup = std::adjacent_find(used.begin(), used.end());
  TORCH_CHECK_VALUE(dup == used.end(), op, ": argument 'state_indices' names slot ", dup == used.end() ? 0 : *dup,
                    " more than once");
  return p;
}

// cu_seqlens: int32 [N+1], starting at 0, non-decreasing, ending at most at T.
const int32_t* check_cu_seqlens(const at::Tensor& cu, int64_t N, int64_t T, const char* op) {
  check_dim(cu, 1, op, "cu_seqlens", "[N+1]");
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": argument 'cu_seqlens' must be int32, got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.is_contiguous(), op, ": argument 'cu_seqlens' must be contiguous");
  TORCH_CHECK_VALUE(cu.size(0) == N + 1, op, ": argument 'cu_seqlens' must have N+1=", N + 1,
                    " entries (N = len(state_indices)), got ", cu.size(0));
  const int32_t* p = cu.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(p[0] == 0, op, ": argument 'cu_seqlens' must start at 0, got ", p[0]);
  for (const auto i : c10::irange(N)) {
    TORCH_CHECK_VALUE(p[i + 1] >= p[i], op, ": argument 'cu_seqlens' must be non-decreasing, got ", p[i], " then ",
                      p[i + 1], " at position ", i);
  }
  TORCH_CHECK_VALUE(p[N] <= T, op, ": argument 'cu_seqlens' ends at ", p[N], ", beyond T=", T, " tokens");
  return p;
}

const bool* check_has_initial_state(const at::Tensor& h, int64_t N, const char* op) {
  check_dim(h, 1, op, "has_initial_state", "[N]");
  check_shape(h, {N}, op, "has_initial_state");
  TORCH_CHECK_TYPE(h.scalar_type() == at::kBool, op, ": argument 'has_initial_state' must be bool, got ",
                   h.scalar_type());
  TORCH_CHECK_VALUE(h.is_contiguous(), op, ": argument 'has_initial_state' must be contiguous");
  return h.data_ptr<bool>();
}

// Rows of out that belong to no sequence are zeroed, so the result never depends on garbage.
void zero_trailing_rows(at::Tensor& out, int64_t covered) {
  if (covered < out.size(0)) out.narrow(0, covered, out.size(0) - covered).zero_();
}

// A_log / dt_bias: [Hv] of any float dtype, used as fp32.
at::Tensor per_head_f32(const at::Tensor& t, int64_t Hv, const char* op, const char* name) {
  check_dim(t, 1, op, name, "[Hv]");
  check_shape(t, {Hv}, op, name);
  to_dtype(t, op, name);
  return t.to(at::kFloat).contiguous();
}

GatingParams gating_params(const at::Tensor& A_log32, const at::Tensor& dt_bias32, const at::Tensor& a,
                           const at::Tensor& b, int64_t T, int64_t Hv, double softplus_beta,
                           double softplus_threshold, bool allow_neg_eigval, const char* op) {
  check_dim(a, 2, op, "a", "[T, Hv]");
  check_dim(b, 2, op, "b", "[T, Hv]");
  check_shape(a, {T, Hv}, op, "a");
  check_shape(b, {T, Hv}, op, "b");
  TORCH_CHECK_VALUE(softplus_beta > 0, op, ": argument 'softplus_beta' must be > 0, got ", softplus_beta);
  GatingParams p{};
  p.T = T;
  p.Hv = Hv;
  p.a = mat2(a, op, "a");
  p.b = mat2(b, op, "b");
  p.A_log = A_log32.data_ptr<float>();
  p.dt_bias = dt_bias32.data_ptr<float>();
  p.softplus_beta = static_cast<float>(softplus_beta);
  p.softplus_threshold = static_cast<float>(softplus_threshold);
  p.allow_neg_eigval = allow_neg_eigval;
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gdn_gating(const at::Tensor& A_log, const at::Tensor& a, const at::Tensor& b,
                                              const at::Tensor& dt_bias, double softplus_beta,
                                              double softplus_threshold, bool allow_neg_eigval) {
  constexpr const char* op = "gdn_gating";
  check_dim(a, 2, op, "a", "[T, Hv]");
  const int64_t T = a.size(0), Hv = a.size(1);
  const at::Tensor A32 = per_head_f32(A_log, Hv, op, "A_log");
  const at::Tensor dt32 = per_head_f32(dt_bias, Hv, op, "dt_bias");
  GatingParams p = gating_params(A32, dt32, a, b, T, Hv, softplus_beta, softplus_threshold, allow_neg_eigval, op);
  at::Tensor g = at::empty({T, Hv}, a.options().dtype(at::kFloat));
  at::Tensor beta = at::empty({T, Hv}, a.options().dtype(at::kFloat));
  p.g = g.data_ptr<float>();
  p.beta = beta.data_ptr<float>();
  active_kernels().gdn_gating(p);
  return {g, beta};
}

void chunk_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                            const at::Tensor& beta, at::Tensor& state, const at::Tensor& state_indices,
                            const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& has_initial_state,
                            double scale, bool use_qk_l2norm, at::Tensor& out) {
  constexpr const char* op = "chunk_gated_delta_rule";
  const QKVShape s = check_qkv(q, k, v, op);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{g, "g"}, {beta, "beta"}}) {
    check_dim(t, 2, op, name, "[T, Hv]");
    check_shape(t, {s.T, s.Hv}, op, name);
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": argument '", name, "' must be float32, got ",
                     t.scalar_type());
    check_last_dim_contiguous(t, op, name);
  }
  check_out(out, q, s, op);
  ChunkParams p{};
  p.state = check_state(state, s, op);
  p.state_indices = check_state_indices(state_indices, p.state.num_slots, op);
  p.N = state_indices.size(0);
  p.cu_seqlens = check_cu_seqlens(cu_seqlens, p.N, s.T, op);
  if (has_initial_state.has_value()) p.has_initial_state = check_has_initial_state(*has_initial_state, p.N, op);
  p.Hk = s.Hk, p.Hv = s.Hv, p.K = s.K, p.V = s.V;
  p.q = mat3(q, op, "q"), p.k = mat3(k, op, "k"), p.v = mat3(v, op, "v"), p.out = mat3(out, op, "out");
  p.g = g.data_ptr<float>(), p.beta = beta.data_ptr<float>();
  p.g_stride = g.stride(0), p.beta_stride = beta.stride(0);
  p.scale = static_cast<float>(scale);
  p.use_qk_l2norm = use_qk_l2norm;
  const GemmChoice gemm = active_gemm();
  p.gemm = gemm.backend;
  gemm.kernels->chunk_gated_delta_rule(p);
  zero_trailing_rows(out, p.cu_seqlens[p.N]);
}

void fused_recurrent_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& A_log, const at::Tensor& dt_bias, const at::Tensor& a,
                                      const at::Tensor& b, at::Tensor& state, const at::Tensor& state_indices,
                                      const std::optional<at::Tensor>& cu_seqlens, double scale,
                                      bool use_qk_l2norm, bool allow_neg_eigval, double softplus_beta,
                                      double softplus_threshold, at::Tensor& out) {
  constexpr const char* op = "fused_recurrent_gated_delta_rule";
  const QKVShape s = check_qkv(q, k, v, op);
  check_out(out, q, s, op);
  const at::Tensor A32 = per_head_f32(A_log, s.Hv, op, "A_log");
  const at::Tensor dt32 = per_head_f32(dt_bias, s.Hv, op, "dt_bias");
  RecurrentParams p{};
  p.gate = gating_params(A32, dt32, a, b, s.T, s.Hv, softplus_beta, softplus_threshold, allow_neg_eigval, op);
  p.state = check_state(state, s, op);
  p.state_indices = check_state_indices(state_indices, p.state.num_slots, op);
  p.N = state_indices.size(0);
  int64_t covered = p.N;
  if (cu_seqlens.has_value()) {
    p.cu_seqlens = check_cu_seqlens(*cu_seqlens, p.N, s.T, op);
    covered = p.cu_seqlens[p.N];
  } else {
    TORCH_CHECK_VALUE(p.N <= s.T, op, ": argument 'state_indices' has N=", p.N,
                      " entries but there are only T=", s.T, " tokens (one token per sequence without cu_seqlens)");
  }
  p.Hk = s.Hk, p.Hv = s.Hv, p.K = s.K, p.V = s.V;
  p.q = mat3(q, op, "q"), p.k = mat3(k, op, "k"), p.v = mat3(v, op, "v"), p.out = mat3(out, op, "out");
  p.scale = static_cast<float>(scale);
  p.use_qk_l2norm = use_qk_l2norm;
  active_kernels().fused_recurrent(p);
  zero_trailing_rows(out, covered);
}

void causal_conv1d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   at::Tensor& conv_state, const at::Tensor& state_indices, const at::Tensor& cu_seqlens,
                   const std::optional<at::Tensor>& has_initial_state, bool silu, at::Tensor& out) {
  constexpr const char* op = "causal_conv1d";
  check_dim(x, 2, op, "x", "[T, D]");
  const int64_t T = x.size(0), D = x.size(1);
  check_dim(weight, 2, op, "weight", "[D, W]");
  const int64_t W = weight.size(1);
  TORCH_CHECK_VALUE(weight.size(0) == D && W >= 2 && W <= 8, op, ": argument 'weight' must have shape [D=", D,
                    ", W] with 2 <= W <= 8, got ", weight.sizes());
  const at::Tensor w32 = weight.to(at::kFloat).t().contiguous();  // [W, D]
  at::Tensor b32;
  if (bias.has_value()) b32 = per_head_f32(*bias, D, op, "bias");
  check_dim(conv_state, 3, op, "conv_state", "[num_slots, W-1, D]");
  TORCH_CHECK_VALUE(conv_state.size(1) == W - 1 && conv_state.size(2) == D, op,
                    ": argument 'conv_state' must have shape [num_slots, ", W - 1, ", ", D, "], got ",
                    conv_state.sizes());
  check_dim(out, 2, op, "out", "[T, D]");
  check_shape(out, {T, D}, op, "out");
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), op, ": argument 'out' must have x's dtype ",
                   x.scalar_type(), ", got ", out.scalar_type());
  ConvParams p{};
  p.T = T, p.D = D, p.W = W;
  p.x = mat2(x, op, "x");
  p.out = mat2(out, op, "out");
  p.weight = w32.data_ptr<float>();
  p.bias = bias.has_value() ? b32.data_ptr<float>() : nullptr;
  p.state = conv_state.data_ptr();
  p.state_dtype = to_dtype(conv_state, op, "conv_state");
  p.state_slot_stride = conv_state.stride(0), p.state_tap_stride = conv_state.stride(1);
  p.state_dim_stride = conv_state.stride(2);
  p.state_indices = check_state_indices(state_indices, conv_state.size(0), op);
  p.N = state_indices.size(0);
  p.cu_seqlens = check_cu_seqlens(cu_seqlens, p.N, T, op);
  if (has_initial_state.has_value()) p.has_initial_state = check_has_initial_state(*has_initial_state, p.N, op);
  p.silu = silu;
  active_kernels().causal_conv1d(p);
  zero_trailing_rows(out, p.cu_seqlens[p.N]);
}

void gdn_decode_step(const at::Tensor& mixed_qkv, const at::Tensor& conv_weight,
                     const std::optional<at::Tensor>& conv_bias, at::Tensor& conv_state, const at::Tensor& A_log,
                     const at::Tensor& dt_bias, const at::Tensor& a, const at::Tensor& b, at::Tensor& ssm_state,
                     const at::Tensor& state_indices, int64_t num_k_heads, int64_t head_k_dim, int64_t head_v_dim,
                     double scale, bool use_qk_l2norm, bool allow_neg_eigval, double softplus_beta,
                     double softplus_threshold, at::Tensor& out) {
  constexpr const char* op = "gdn_decode_step";
  check_dim(mixed_qkv, 2, op, "mixed_qkv", "[B, 2*Hk*K + Hv*V]");
  check_dim(a, 2, op, "a", "[B, Hv]");
  const int64_t B = mixed_qkv.size(0), Hv = a.size(1), Hk = num_k_heads, K = head_k_dim, V = head_v_dim;
  TORCH_CHECK_VALUE(Hk > 0 && K > 0 && V > 0, op, ": arguments 'num_k_heads', 'head_k_dim', 'head_v_dim' must be "
                    "positive, got ", Hk, ", ", K, ", ", V);
  TORCH_CHECK_VALUE(mixed_qkv.size(1) == 2 * Hk * K + Hv * V, op, ": argument 'mixed_qkv' must have 2*Hk*K + Hv*V = ",
                    2 * Hk * K + Hv * V, " channels (Hk=", Hk, ", K=", K, ", Hv=", Hv, ", V=", V, "), got ",
                    mixed_qkv.size(1));
  TORCH_CHECK_VALUE(state_indices.dim() == 1 && state_indices.size(0) == B, op,
                    ": argument 'state_indices' must have one entry per token (", B, "), got shape ",
                    state_indices.sizes());
  // Conv output in the model dtype, exactly what the unfused path hands to the recurrence.
  at::Tensor qkv = at::empty_like(mixed_qkv, at::MemoryFormat::Contiguous);
  const at::Tensor cu = at::arange(B + 1, state_indices.options());
  causal_conv1d(mixed_qkv, conv_weight, conv_bias, conv_state, state_indices, cu, std::nullopt, /*silu=*/true, qkv);
  const at::Tensor q = qkv.narrow(1, 0, Hk * K).view({B, Hk, K});
  const at::Tensor k = qkv.narrow(1, Hk * K, Hk * K).view({B, Hk, K});
  const at::Tensor v = qkv.narrow(1, 2 * Hk * K, Hv * V).view({B, Hv, V});
  fused_recurrent_gated_delta_rule(q, k, v, A_log, dt_bias, a, b, ssm_state, state_indices, std::nullopt, scale,
                                   use_qk_l2norm, allow_neg_eigval, softplus_beta, softplus_threshold, out);
}

void stream_scale(at::Tensor& x, double factor) {
  constexpr const char* op = "stream_scale";
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, op, ": argument 'x' must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": argument 'x' must be contiguous");
  active_kernels().stream_scale(x.data_ptr<float>(), x.numel(), static_cast<float>(factor));
}

at::Tensor gemm_probe(bool bf16, double seconds) {
  TORCH_CHECK_VALUE(seconds > 0 && seconds <= 60, "gemm_probe: argument 'seconds' must be in (0, 60], got ", seconds);
  constexpr int64_t M = 64, N = 128, K = 128;  // the chunk kernel's products (chunk 64, head dim 128)
  const GemmChoice gemm = active_gemm();
  at::Tensor rates = at::zeros({at::get_num_threads()}, at::kDouble);
  gemm.kernels->gemm_probe(gemm.backend, bf16, M, N, K, seconds, rates.data_ptr<double>());
  return rates;
}

std::string runtime_info() {
  const GemmChoice gemm = active_gemm();
  return std::string("isa=") + active_kernels().isa + ";available=" + c10::Join(",", available_isas()) +
         ";gemm=" + gemm.backend.name + (gemm.backend.use_bf16 ? "" : "-fp32") +
         ";gemms=" + c10::Join(",", available_gemms()) + ";threads=" + std::to_string(at::get_num_threads());
}

}  // namespace gdn
