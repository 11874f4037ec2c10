// Host entry points of the Kimi Delta Attention ops (argument checks, then the active ISA's kernel).
#include <ATen/ATen.h>

#include <vector>

#include "common/checks.h"
#include "common/runtime.h"
#include "ops.h"

namespace gdn {
namespace {

// A fp32 contiguous copy (or the tensor itself) of a 1-D parameter of n entries.
at::Tensor vector_f32(const at::Tensor& t, int64_t n, const char* op, const char* name, const char* layout) {
  check_dim(t, 1, op, name, layout);
  check_shape(t, {n}, op, name);
  to_dtype(t, op, name);
  return t.to(at::kFloat).contiguous();
}

// The gate's inputs: f [T, H, K], b [T, H], A_log [H], dt_bias [H*K]. A_log32 / dt32 keep the fp32
// copies alive.
KdaGateParams gate_params(const at::Tensor& A_log, const at::Tensor& f, const at::Tensor& b,
                          const at::Tensor& dt_bias, std::optional<double> lower_bound, int64_t T, int64_t H,
                          int64_t K, at::Tensor& A_log32, at::Tensor& dt32, const char* op) {
  check_dim(f, 3, op, "f", "[T, H, K]");
  check_shape(f, {T, H, K}, op, "f");
  check_dim(b, 2, op, "b", "[T, H]");
  check_shape(b, {T, H}, op, "b");
  A_log32 = vector_f32(A_log, H, op, "A_log", "[H]");
  check_finite_entries(A_log32.data_ptr<float>(), H, op, "A_log");
  if (lower_bound.has_value()) check_finite(*lower_bound, op, "lower_bound");
  dt32 = vector_f32(dt_bias, H * K, op, "dt_bias", "[H*K]");
  KdaGateParams p{};
  p.T = T, p.H = H, p.K = K;
  p.f = mat3(f, op, "f");
  p.b = mat2(b, op, "b");
  p.A_log = A_log32.data_ptr<float>();
  p.dt_bias = dt32.data_ptr<float>();
  p.has_lower_bound = lower_bound.has_value();
  p.lower_bound = static_cast<float>(lower_bound.value_or(0.0));
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kda_gate(const at::Tensor& A_log, const at::Tensor& f, const at::Tensor& b,
                                            const at::Tensor& dt_bias, std::optional<double> lower_bound) {
  constexpr const char* op = "kda_gate";
  check_dim(f, 3, op, "f", "[T, H, K]");
  const int64_t T = f.size(0), H = f.size(1), K = f.size(2);
  at::Tensor A32, dt32;
  KdaGateParams p = gate_params(A_log, f, b, dt_bias, lower_bound, T, H, K, A32, dt32, op);
  at::Tensor g = at::empty({T, H, K}, f.options().dtype(at::kFloat));
  at::Tensor beta = at::empty({T, H}, f.options().dtype(at::kFloat));
  p.g = g.data_ptr<float>();
  p.beta = beta.data_ptr<float>();
  active_kernels().kda_gate(p);
  return {g, beta};
}

void chunk_kda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
               const at::Tensor& beta, at::Tensor& state, const at::Tensor& state_indices,
               const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& has_initial_state, double scale,
               bool use_qk_l2norm, at::Tensor& out) {
  constexpr const char* op = "chunk_kda";
  const QKVShape s = check_qkv(q, k, v, op, /*grouped=*/false);  // KDA: Hk == Hv, written H
  check_dim(g, 3, op, "g", "[T, H, K]");
  check_shape(g, {s.T, s.Hv, s.K}, op, "g");
  check_dim(beta, 2, op, "beta", "[T, H]");
  check_shape(beta, {s.T, s.Hv}, op, "beta");
  for (const at::Tensor* t : {&g, &beta}) {
    const char* name = t == &g ? "g" : "beta";
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": argument '", name, "' must be float32, got ",
                     t->scalar_type());
  }
  check_out(out, q, s, op);
  check_finite(scale, op, "scale");
  KdaParams p{};
  p.state = check_state(state, s, op);
  check_disjoint(out, "out", state, "state", op);
  p.state_indices = check_state_indices(state_indices, p.state.num_slots, op);
  p.N = state_indices.size(0);
  p.cu_seqlens = check_cu_seqlens(cu_seqlens, p.N, s.T, op);
  if (has_initial_state.has_value()) p.has_initial_state = check_has_initial_state(*has_initial_state, p.N, op);
  p.H = s.Hv, p.K = s.K, p.V = s.V;
  p.q = mat3(q, op, "q"), p.k = mat3(k, op, "k"), p.v = mat3(v, op, "v"), p.out = mat3(out, op, "out");
  p.g = mat3(g, op, "g");
  p.beta = mat2(beta, op, "beta");
  p.scale = static_cast<float>(scale);
  p.use_qk_l2norm = use_qk_l2norm;
  const GemmChoice gemm = active_gemm();
  p.gemm = gemm.backend;
  gemm.kernels->chunk_kda(p);
  zero_trailing_rows(out, p.cu_seqlens[p.N]);
}

void fused_recurrent_kda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& A_log,
                         const at::Tensor& dt_bias, const at::Tensor& f, const at::Tensor& b, at::Tensor& state,
                         const at::Tensor& state_indices, const std::optional<at::Tensor>& cu_seqlens, double scale,
                         bool use_qk_l2norm, std::optional<double> lower_bound, at::Tensor& out) {
  constexpr const char* op = "fused_recurrent_kda";
  const QKVShape s = check_qkv(q, k, v, op, /*grouped=*/false);  // KDA: Hk == Hv, written H
  check_out(out, q, s, op);
  at::Tensor A32, dt32;
  KdaParams p{};
  check_finite(scale, op, "scale");
  p.gate = gate_params(A_log, f, b, dt_bias, lower_bound, s.T, s.Hv, s.K, A32, dt32, op);
  p.state = check_state(state, s, op);
  check_disjoint(out, "out", state, "state", op);
  p.state_indices = check_state_indices(state_indices, p.state.num_slots, op);
  p.N = state_indices.size(0);
  const int64_t covered = check_recurrent_sequences(cu_seqlens, p.N, s.T, op, &p.cu_seqlens);
  p.H = s.Hv, p.K = s.K, p.V = s.V;
  p.q = mat3(q, op, "q"), p.k = mat3(k, op, "k"), p.v = mat3(v, op, "v"), p.out = mat3(out, op, "out");
  p.scale = static_cast<float>(scale);
  p.use_qk_l2norm = use_qk_l2norm;
  active_kernels().fused_recurrent_kda(p);
  zero_trailing_rows(out, covered);
}

}  // namespace gdn
