// Host entry points of the Mamba-1 selective-scan ops (argument checks, then the active ISA's kernel).
#include <ATen/ATen.h>

#include <vector>

#include "common/checkpoint_checks.h"
#include "common/checks.h"
#include "common/runtime.h"
#include "ops.h"

namespace gdn {
namespace {

struct Shape {
  int64_t T, Dm, Nst;
};

// x [T, Dm]; dt [T, Dm] any float dtype; A [Dm, N]; B/C [T, N] in x's dtype or fp32; z [T, Dm] in
// x's dtype or None; out [T, Dm] in x's dtype.
Shape check_inputs(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& C, const std::optional<at::Tensor>& z, const at::Tensor& out, const char* op) {
  check_dim(x, 2, op, "x", "[T, Dm]");
  check_dim(dt, 2, op, "dt", "[T, Dm]");
  check_dim(A, 2, op, "A", "[Dm, N]");
  check_dim(B, 2, op, "B", "[T, N]");
  check_dim(C, 2, op, "C", "[T, N]");
  const Shape s{x.size(0), x.size(1), A.size(1)};
  TORCH_CHECK_VALUE(s.Dm > 0, op, ": argument 'x' must have at least one channel, got shape ", x.sizes());
  TORCH_CHECK_VALUE(A.size(0) == s.Dm && s.Nst > 0, op, ": argument 'A' must have shape [Dm=", s.Dm,
                    ", N] with N > 0, got ", A.sizes());
  check_shape(dt, x.sizes(), op, "dt");
  check_shape(B, {s.T, s.Nst}, op, "B");
  check_shape(C, {s.T, s.Nst}, op, "C");
  const at::ScalarType dtype = x.scalar_type();
  to_dtype(x, op, "x");
  to_dtype(dt, op, "dt");
  to_dtype(A, op, "A");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{B, "B"}, {C, "C"}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype || t.scalar_type() == at::kFloat, op, ": argument '", name,
                     "' must have x's dtype ", dtype, " or float32, got ", t.scalar_type());
  }
  check_dim(out, 2, op, "out", "[T, Dm]");
  check_shape(out, x.sizes(), op, "out");
  check_no_self_overlap(out, op, "out");
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, op, ": argument 'out' must have x's dtype ", dtype, ", got ",
                   out.scalar_type());
  if (z.has_value()) {
    check_dim(*z, 2, op, "z", "[T, Dm]");
    check_shape(*z, x.sizes(), op, "z");
    TORCH_CHECK_TYPE(z->scalar_type() == dtype, op, ": argument 'z' must have x's dtype ", dtype, ", got ",
                     z->scalar_type());
  }
  return s;
}

// The state pool [num_slots, Dm, N], contiguous within each slot.
StatePool check_state(const at::Tensor& state, const Shape& s, const char* op) {
  check_dim(state, 3, op, "state", "[num_slots, Dm, N]");
  TORCH_CHECK_VALUE(state.size(1) == s.Dm && state.size(2) == s.Nst, op, ": argument 'state' must have shape "
                    "[num_slots, ", s.Dm, ", ", s.Nst, "], got ", state.sizes());
  TORCH_CHECK_VALUE(state.stride(2) == 1 && state.stride(1) == s.Nst, op,
                    ": argument 'state' must be contiguous within each slot, got strides ", state.strides());
  check_no_self_overlap(state, op, "state");
  return StatePool{state.data_ptr(), to_dtype(state, op, "state"), state.stride(0), state.size(0)};
}

std::optional<at::Tensor> opt_per_channel(const std::optional<at::Tensor>& t, int64_t Dm, const char* op,
                                          const char* name) {
  if (!t.has_value()) return std::nullopt;
  check_dim(*t, 1, op, name, "[Dm]");
  check_shape(*t, {Dm}, op, name);
  to_dtype(*t, op, name);
  return t->to(at::kFloat).contiguous();
}

Mat2 as_mat2(const at::Tensor& t, const char* op, const char* name) {
  check_last_dim_contiguous(t, op, name);
  return Mat2{t.data_ptr(), to_dtype(t, op, name), t.stride(0)};
}

// Fills everything but the sequence layout. A32 / D32 / bias32 must outlive the kernel call.
Mamba1Params common_params(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A32, const at::Tensor& B,
                           const at::Tensor& C, const std::optional<at::Tensor>& D32,
                           const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias32,
                           at::Tensor& state, bool dt_softplus, at::Tensor& out, const Shape& s, const char* op) {
  Mamba1Params p{};
  p.Dm = s.Dm, p.Nst = s.Nst;
  p.x = as_mat2(x, op, "x"), p.dt = as_mat2(dt, op, "dt"), p.B = as_mat2(B, op, "B"), p.C = as_mat2(C, op, "C");
  p.out = as_mat2(out, op, "out");
  p.z = z.has_value() ? as_mat2(*z, op, "z") : Mat2{nullptr, p.x.dtype, 0};
  p.A = A32.data_ptr<float>();
  p.D = D32.has_value() ? D32->data_ptr<float>() : nullptr;
  p.dt_bias = bias32.has_value() ? bias32->data_ptr<float>() : nullptr;
  p.dt_softplus = dt_softplus;
  p.state = check_state(state, s, op);
  check_disjoint(out, "out", state, "state", op);
  return p;
}


}  // namespace

void mamba1_selective_scan(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                           const at::Tensor& C, const std::optional<at::Tensor>& D,
                           const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias,
                           at::Tensor& state, const at::Tensor& state_indices, const at::Tensor& cu_seqlens,
                           const std::optional<at::Tensor>& has_initial_state, bool dt_softplus,
                           const std::optional<at::Tensor>& checkpoint_offsets,
                           const std::optional<at::Tensor>& checkpoint_slots, at::Tensor& out) {
  constexpr const char* op = "selective_scan";
  const Shape s = check_inputs(x, dt, A, B, C, z, out, op);
  const at::Tensor A32 = A.to(at::kFloat).contiguous();
  const auto D32 = opt_per_channel(D, s.Dm, op, "D"), bias32 = opt_per_channel(dt_bias, s.Dm, op, "dt_bias");
  Mamba1Params p = common_params(x, dt, A32, B, C, D32, z, bias32, state, dt_softplus, out, s, op);
  p.state_indices = check_state_indices(state_indices, p.state.num_slots, op);
  p.N = state_indices.size(0);
  p.cu_seqlens = check_cu_seqlens(cu_seqlens, p.N, s.T, op);
  if (has_initial_state.has_value()) p.has_initial_state = check_has_initial_state(*has_initial_state, p.N, op);
  check_checkpoints(checkpoint_offsets, checkpoint_slots, p, op);
  active_kernels().mamba1_selective_scan(p);
  zero_trailing_rows(out, p.cu_seqlens[p.N]);
}

void mamba1_state_update(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                         const std::optional<at::Tensor>& dt_bias, at::Tensor& state, const at::Tensor& state_indices,
                         bool dt_softplus, at::Tensor& out) {
  constexpr const char* op = "selective_state_update";
  const Shape s = check_inputs(x, dt, A, B, C, z, out, op);
  const at::Tensor A32 = A.to(at::kFloat).contiguous();
  const auto D32 = opt_per_channel(D, s.Dm, op, "D"), bias32 = opt_per_channel(dt_bias, s.Dm, op, "dt_bias");
  Mamba1Params p = common_params(x, dt, A32, B, C, D32, z, bias32, state, dt_softplus, out, s, op);
  p.state_indices = check_state_indices(state_indices, p.state.num_slots, op);
  p.N = state_indices.size(0);
  TORCH_CHECK_VALUE(p.N == s.T, op, ": argument 'state_indices' must have one entry per sequence (x has ", s.T,
                    "), got ", p.N);
  active_kernels().mamba1_state_update(p);
}

}  // namespace gdn
