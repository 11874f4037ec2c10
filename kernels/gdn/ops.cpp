// Host entry points of the Gated DeltaNet ops (argument checks, then the active ISA's kernel).
#include <ATen/ATen.h>

#include <cmath>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/runtime.h"
#include "ops.h"

namespace gdn {
namespace {

// A per-head [Hv] parameter as fp32: the tensor's own data when it is fp32 and contiguous, else
// converted into `buffer` (the checks of per_head_f32).
const float* per_head_f32_ptr(const at::Tensor& t, int64_t Hv, const char* op, const char* name,
                              std::vector<float>& buffer) {
  check_dim(t, 1, op, name, "[Hv]");
  check_shape(t, {Hv}, op, name);
  const DType dt = to_dtype(t, op, name);
  if (dt == DType::kFloat32 && (Hv <= 1 || t.stride(0) == 1)) {
    check_finite_entries(t.data_ptr<float>(), Hv, op, name);
    return t.data_ptr<float>();
  }
  buffer.resize(Hv);
  const int64_t stride = t.stride(0);
  if (dt == DType::kFloat32) {
    for (int64_t i = 0; i < Hv; ++i) buffer[i] = t.data_ptr<float>()[i * stride];
  } else if (dt == DType::kBFloat16) {
    for (int64_t i = 0; i < Hv; ++i) buffer[i] = static_cast<float>(t.data_ptr<at::BFloat16>()[i * stride]);
  } else {
    for (int64_t i = 0; i < Hv; ++i) buffer[i] = static_cast<float>(t.data_ptr<at::Half>()[i * stride]);
  }
  check_finite_entries(buffer.data(), Hv, op, name);
  return buffer.data();
}

GatingParams gating_params(const float* A_log32, const float* dt_bias32, const at::Tensor& a,
                           const at::Tensor& b, int64_t T, int64_t Hv, double softplus_beta,
                           double softplus_threshold, bool allow_neg_eigval, const char* op) {
  check_dim(a, 2, op, "a", "[T, Hv]");
  check_dim(b, 2, op, "b", "[T, Hv]");
  check_shape(a, {T, Hv}, op, "a");
  check_shape(b, {T, Hv}, op, "b");
  check_finite(softplus_beta, op, "softplus_beta");
  TORCH_CHECK_VALUE(softplus_beta > 0, op, ": argument 'softplus_beta' must be > 0, got ", softplus_beta);
  TORCH_CHECK_VALUE(!std::isnan(softplus_threshold), op, ": argument 'softplus_threshold' must not be NaN");
  GatingParams p{};
  p.T = T;
  p.Hv = Hv;
  p.a = mat2(a, op, "a");
  p.b = mat2(b, op, "b");
  p.A_log = A_log32;
  p.dt_bias = dt_bias32;
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
  check_finite_entries(A32.data_ptr<float>(), Hv, op, "A_log");
  check_finite_entries(dt32.data_ptr<float>(), Hv, op, "dt_bias");
  GatingParams p = gating_params(A32.data_ptr<float>(), dt32.data_ptr<float>(), a, b, T, Hv, softplus_beta,
                                 softplus_threshold, allow_neg_eigval, op);
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
  const QKVShape s = check_qkv(q, k, v, op, /*grouped=*/true);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{g, "g"}, {beta, "beta"}}) {
    check_dim(t, 2, op, name, "[T, Hv]");
    check_shape(t, {s.T, s.Hv}, op, name);
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": argument '", name, "' must be float32, got ",
                     t.scalar_type());
    check_last_dim_contiguous(t, op, name);
  }
  check_out(out, q, s, op);
  check_finite(scale, op, "scale");
  ChunkParams p{};
  p.state = check_state(state, s, op);
  check_disjoint(out, "out", state, "state", op);
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

namespace {

// Every check of the decode recurrence, and its parameters (A32 / dt32 keep fp32 copies of A_log /
// dt_bias alive); *covered: how many leading rows of out the sequences cover. Nothing is written.
RecurrentParams recurrent_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& A_log, const at::Tensor& dt_bias, const at::Tensor& a,
                                 const at::Tensor& b, const at::Tensor& state, const at::Tensor& state_indices,
                                 const std::optional<at::Tensor>& cu_seqlens, double scale, bool use_qk_l2norm,
                                 bool allow_neg_eigval, double softplus_beta, double softplus_threshold,
                                 const at::Tensor& out, std::vector<float>& A32, std::vector<float>& dt32,
                                 int64_t* covered, const char* op, const char* state_name) {
  const QKVShape s = check_qkv(q, k, v, op, /*grouped=*/true);
  check_out(out, q, s, op);
  // A_log / dt_bias as fp32 without a tensor op per call (bf16 ones converted here: at batch 1
  // two at::Tensor conversions were a third of the fixed cost of a call).
  RecurrentParams p{};
  p.gate = gating_params(per_head_f32_ptr(A_log, s.Hv, op, "A_log", A32),
                         per_head_f32_ptr(dt_bias, s.Hv, op, "dt_bias", dt32), a, b, s.T, s.Hv, softplus_beta,
                         softplus_threshold, allow_neg_eigval, op);
  p.state = check_state(state, s, op, state_name);
  check_disjoint(out, "out", state, state_name, op);
  check_finite(scale, op, "scale");
  p.state_indices = check_state_indices(state_indices, p.state.num_slots, op);
  p.N = state_indices.size(0);
  *covered = check_recurrent_sequences(cu_seqlens, p.N, s.T, op, &p.cu_seqlens);
  p.Hk = s.Hk, p.Hv = s.Hv, p.K = s.K, p.V = s.V;
  p.q = mat3(q, op, "q"), p.k = mat3(k, op, "k"), p.v = mat3(v, op, "v"), p.out = mat3(out, op, "out");
  p.scale = static_cast<float>(scale);
  p.use_qk_l2norm = use_qk_l2norm;
  return p;
}

}  // namespace

void fused_recurrent_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& A_log, const at::Tensor& dt_bias, const at::Tensor& a,
                                      const at::Tensor& b, at::Tensor& state, const at::Tensor& state_indices,
                                      const std::optional<at::Tensor>& cu_seqlens, double scale,
                                      bool use_qk_l2norm, bool allow_neg_eigval, double softplus_beta,
                                      double softplus_threshold, at::Tensor& out) {
  std::vector<float> A32, dt32;
  int64_t covered = 0;
  const RecurrentParams p = recurrent_params(q, k, v, A_log, dt_bias, a, b, state, state_indices, cu_seqlens, scale,
                                             use_qk_l2norm, allow_neg_eigval, softplus_beta, softplus_threshold, out,
                                             A32, dt32, &covered, "fused_recurrent_gated_delta_rule", "state");
  active_kernels().fused_recurrent(p);
  zero_trailing_rows(out, covered);
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
  check_disjoint(out, "out", conv_state, "conv_state", op);
  // Conv output in the model dtype, exactly what the unfused path hands to the recurrence. The
  // recurrence's arguments are checked before the conv writes its state: a refused call writes nothing.
  at::Tensor qkv = at::empty_like(mixed_qkv, at::MemoryFormat::Contiguous);
  const at::Tensor q = qkv.narrow(1, 0, Hk * K).view({B, Hk, K});
  const at::Tensor k = qkv.narrow(1, Hk * K, Hk * K).view({B, Hk, K});
  const at::Tensor v = qkv.narrow(1, 2 * Hk * K, Hv * V).view({B, Hv, V});
  std::vector<float> A32, dt32;
  int64_t covered = 0;
  const RecurrentParams p = recurrent_params(q, k, v, A_log, dt_bias, a, b, ssm_state, state_indices, std::nullopt,
                                             scale, use_qk_l2norm, allow_neg_eigval, softplus_beta,
                                             softplus_threshold, out, A32, dt32, &covered, op, "ssm_state");
  const at::Tensor cu = at::arange(B + 1, state_indices.options());
  causal_conv1d(mixed_qkv, conv_weight, conv_bias, conv_state, state_indices, cu, std::nullopt, /*silu=*/true, qkv);
  active_kernels().fused_recurrent(p);
  zero_trailing_rows(out, covered);
}

}  // namespace gdn
