// Tensor-level entry points that other families' ops call (each op's own entry point lives, and is
// registered, in its family's ops.cpp; see kernels/common/op_registration.h).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace gdn {

// Depthwise causal conv1d over a varlen batch (kernels/common/ops.cpp); GDN's fused decode step
// runs it before the recurrence.
void causal_conv1d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   at::Tensor& conv_state, const at::Tensor& state_indices, const at::Tensor& cu_seqlens,
                   const std::optional<at::Tensor>& has_initial_state, bool silu, at::Tensor& out);

}  // namespace gdn
