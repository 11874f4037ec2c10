// Host entry points of the Mamba2 (SSD) ops (argument checks, then the active ISA's kernel).
#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "common/checkpoint_checks.h"
#include "common/checks.h"
#include "common/runtime.h"
#include "ops.h"

namespace gdn {
namespace {

struct Shape {
  int64_t T, H, P, G, Nst;
};

// x [T, H, P], dt [T, H], B/C [T, G, N] (x's dtype), z [T, H, P] or None, out [T, H, P].
Shape check_inputs(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& B, const at::Tensor& C,
                   const std::optional<at::Tensor>& z, const at::Tensor& out, const char* op) {
  check_dim(x, 3, op, "x", "[T, H, P]");
  check_dim(dt, 2, op, "dt", "[T, H]");
  check_dim(B, 3, op, "B", "[T, G, N]");
  check_dim(C, 3, op, "C", "[T, G, N]");
  Shape s{x.size(0), x.size(1), x.size(2), B.size(1), B.size(2)};
  TORCH_CHECK_VALUE(s.H > 0 && s.P > 0, op, ": argument 'x' must have non-empty heads, got shape ", x.sizes());
  TORCH_CHECK_VALUE(s.G > 0 && s.Nst > 0, op, ": argument 'B' must have at least one group and d_state > 0, got "
                    "shape ", B.sizes());
  check_shape(dt, {s.T, s.H}, op, "dt");
  TORCH_CHECK_VALUE(B.size(0) == s.T, op, ": argument 'B' must have T=", s.T, " tokens like x, got shape ",
                    B.sizes());
  check_shape(C, B.sizes(), op, "C");
  TORCH_CHECK_VALUE(s.H % s.G == 0, op, ": argument 'B' must have a number of groups (", s.G,
                    ") that divides x's number of heads (", s.H, ")");
  const at::ScalarType dtype = x.scalar_type();
  to_dtype(x, op, "x");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{B, "B"}, {C, "C"}, {out, "out"}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": argument '", name, "' must have x's dtype ", dtype, ", got ",
                     t.scalar_type());
  }
  to_dtype(dt, op, "dt");
  check_dim(out, 3, op, "out", "[T, H, P]");
  check_shape(out, x.sizes(), op, "out");
  check_no_self_overlap(out, op, "out");
  if (z.has_value()) {
    check_dim(*z, 3, op, "z", "[T, H, P]");
    check_shape(*z, x.sizes(), op, "z");
    TORCH_CHECK_TYPE(z->scalar_type() == dtype, op, ": argument 'z' must have x's dtype ", dtype, ", got ",
                     z->scalar_type());
  }
  return s;
}

StatePool check_state(const at::Tensor& state, const Shape& s, const char* op) {
  return check_state_pool(state, s.H, s.P, s.Nst, "[num_slots, H, P, N]", op);
}

// Fills everything but the sequence layout (state_indices, cu_seqlens, checkpoints).
Mamba2Params common_params(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A32,
                           const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D32,
                           const std::optional<at::Tensor>& bias32, at::Tensor& state,
                           const std::optional<at::Tensor>& z, bool dt_softplus, double dt_min, double dt_max,
                           at::Tensor& out, const Shape& s, const char* op) {
  check_finite(dt_min, op, "dt_limit[0]");
  TORCH_CHECK_VALUE(dt_min >= 0 && dt_min <= dt_max, op, ": argument 'dt_limit' must satisfy 0 <= lo <= hi, got (",
                    dt_min, ", ", dt_max, ")");
  const float* A = A32.data_ptr<float>();
  for (int64_t h = 0; h < s.H; ++h) {
    TORCH_CHECK_VALUE(A[h] <= 0.f, op, ": argument 'A' must be <= 0 (A = -exp(A_log)), got ", A[h], " at head ", h);
  }
  check_finite_entries(A, s.H, op, "A");
  if (D32.has_value()) check_finite_entries(D32->data_ptr<float>(), s.H, op, "D");
  if (bias32.has_value()) check_finite_entries(bias32->data_ptr<float>(), s.H, op, "dt_bias");
  Mamba2Params p{};
  p.H = s.H, p.P = s.P, p.G = s.G, p.Nst = s.Nst;
  p.x = mat3(x, op, "x"), p.B = mat3(B, op, "B"), p.C = mat3(C, op, "C"), p.out = mat3(out, op, "out");
  p.z = z.has_value() ? mat3(*z, op, "z") : Mat3{nullptr, p.x.dtype, 0, 0};
  p.dt = mat2(dt, op, "dt");
  p.A = A;
  p.D = D32.has_value() ? D32->data_ptr<float>() : nullptr;
  p.dt_bias = bias32.has_value() ? bias32->data_ptr<float>() : nullptr;
  p.dt_softplus = dt_softplus;
  p.dt_min = static_cast<float>(dt_min);
  p.dt_max = std::isinf(dt_max) ? INFINITY : static_cast<float>(dt_max);
  p.state = check_state(state, s, op);
  check_disjoint(out, "out", state, "state", op);
  return p;
}

std::optional<at::Tensor> opt_per_head(const std::optional<at::Tensor>& t, int64_t H, const char* op,
                                       const char* name) {
  if (!t.has_value()) return std::nullopt;
  return per_head_f32(*t, H, op, name);
}


}  // namespace

void mamba2_chunk_scan(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& C, const std::optional<at::Tensor>& D,
                       const std::optional<at::Tensor>& dt_bias, at::Tensor& state, const at::Tensor& state_indices,
                       const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& has_initial_state,
                       const std::optional<at::Tensor>& z, bool dt_softplus, double dt_min, double dt_max,
                       const std::optional<at::Tensor>& checkpoint_offsets,
                       const std::optional<at::Tensor>& checkpoint_slots, at::Tensor& out) {
  constexpr const char* op = "mamba2_chunk_scan";
  const Shape s = check_inputs(x, dt, B, C, z, out, op);
  const at::Tensor A32 = per_head_f32(A, s.H, op, "A");
  const auto D32 = opt_per_head(D, s.H, op, "D"), bias32 = opt_per_head(dt_bias, s.H, op, "dt_bias");
  Mamba2Params p = common_params(x, dt, A32, B, C, D32, bias32, state, z, dt_softplus, dt_min, dt_max, out, s, op);
  p.state_indices = check_state_indices(state_indices, p.state.num_slots, op);
  p.N = state_indices.size(0);
  p.cu_seqlens = check_cu_seqlens(cu_seqlens, p.N, s.T, op);
  if (has_initial_state.has_value()) p.has_initial_state = check_has_initial_state(*has_initial_state, p.N, op);
  check_checkpoints(checkpoint_offsets, checkpoint_slots, p, op);
  const GemmChoice gemm = active_gemm();
  p.gemm = gemm.backend;
  gemm.kernels->mamba2_chunk_scan(p);
  zero_trailing_rows(out, p.cu_seqlens[p.N]);
}

void mamba2_state_update(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& C, const std::optional<at::Tensor>& D,
                         const std::optional<at::Tensor>& dt_bias, at::Tensor& state,
                         const at::Tensor& state_indices, const std::optional<at::Tensor>& z, bool dt_softplus,
                         double dt_min, double dt_max, at::Tensor& out) {
  constexpr const char* op = "mamba2_state_update";
  const Shape s = check_inputs(x, dt, B, C, z, out, op);
  const at::Tensor A32 = per_head_f32(A, s.H, op, "A");
  const auto D32 = opt_per_head(D, s.H, op, "D"), bias32 = opt_per_head(dt_bias, s.H, op, "dt_bias");
  Mamba2Params p = common_params(x, dt, A32, B, C, D32, bias32, state, z, dt_softplus, dt_min, dt_max, out, s, op);
  p.state_indices = check_state_indices(state_indices, p.state.num_slots, op);
  p.N = state_indices.size(0);
  TORCH_CHECK_VALUE(p.N == s.T, op, ": argument 'state_indices' must have one entry per sequence (x has ", s.T,
                    "), got ", p.N);
  active_kernels().mamba2_state_update(p);
}

}  // namespace gdn
