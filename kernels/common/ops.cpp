// Host entry points of the ops shared by the layer families (causal conv1d) and of the benchmark
// probes and run-time report.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/StringUtil.h>

#include "common/checks.h"
#include "common/runtime.h"
#include "ops.h"

namespace gdn {

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
  check_no_self_overlap(out, op, "out");
  check_no_self_overlap(conv_state, op, "conv_state");
  check_disjoint(out, "out", conv_state, "conv_state", op);
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
