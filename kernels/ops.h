// Tensor-level entry points of the ops (argument checks, then the active ISA's kernel).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace gdn {

std::tuple<at::Tensor, at::Tensor> gdn_gating(const at::Tensor& A_log, const at::Tensor& a, const at::Tensor& b,
                                              const at::Tensor& dt_bias, double softplus_beta,
                                              double softplus_threshold, bool allow_neg_eigval);

void chunk_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                            const at::Tensor& beta, at::Tensor& state, const at::Tensor& state_indices,
                            const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& has_initial_state,
                            double scale, bool use_qk_l2norm, at::Tensor& out);

void fused_recurrent_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& A_log, const at::Tensor& dt_bias, const at::Tensor& a,
                                      const at::Tensor& b, at::Tensor& state, const at::Tensor& state_indices,
                                      const std::optional<at::Tensor>& cu_seqlens, double scale,
                                      bool use_qk_l2norm, bool allow_neg_eigval, double softplus_beta,
                                      double softplus_threshold, at::Tensor& out);

void causal_conv1d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   at::Tensor& conv_state, const at::Tensor& state_indices, const at::Tensor& cu_seqlens,
                   const std::optional<at::Tensor>& has_initial_state, bool silu, at::Tensor& out);

void gdn_decode_step(const at::Tensor& mixed_qkv, const at::Tensor& conv_weight,
                     const std::optional<at::Tensor>& conv_bias, at::Tensor& conv_state, const at::Tensor& A_log,
                     const at::Tensor& dt_bias, const at::Tensor& a, const at::Tensor& b, at::Tensor& ssm_state,
                     const at::Tensor& state_indices, int64_t num_k_heads, int64_t head_k_dim, int64_t head_v_dim,
                     double scale, bool use_qk_l2norm, bool allow_neg_eigval, double softplus_beta,
                     double softplus_threshold, at::Tensor& out);

// Mamba2 (SSD): chunked prefill and one-token decode (kernels/mamba2/ops.cpp).
void mamba2_chunk_scan(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& C, const std::optional<at::Tensor>& D,
                       const std::optional<at::Tensor>& dt_bias, at::Tensor& state, const at::Tensor& state_indices,
                       const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& has_initial_state,
                       const std::optional<at::Tensor>& z, bool dt_softplus, double dt_min, double dt_max,
                       const std::optional<at::Tensor>& checkpoint_offsets,
                       const std::optional<at::Tensor>& checkpoint_slots, at::Tensor& out);
void mamba2_state_update(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& C, const std::optional<at::Tensor>& D,
                         const std::optional<at::Tensor>& dt_bias, at::Tensor& state,
                         const at::Tensor& state_indices, const std::optional<at::Tensor>& z, bool dt_softplus,
                         double dt_min, double dt_max, at::Tensor& out);

// Mamba-1 selective scan: varlen prefill and one-token decode (kernels/mamba1/ops.cpp).
void mamba1_selective_scan(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                           const at::Tensor& C, const std::optional<at::Tensor>& D,
                           const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias,
                           at::Tensor& state, const at::Tensor& state_indices, const at::Tensor& cu_seqlens,
                           const std::optional<at::Tensor>& has_initial_state, bool dt_softplus,
                           const std::optional<at::Tensor>& checkpoint_offsets,
                           const std::optional<at::Tensor>& checkpoint_slots, at::Tensor& out);
void mamba1_state_update(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                         const std::optional<at::Tensor>& dt_bias, at::Tensor& state, const at::Tensor& state_indices,
                         bool dt_softplus, at::Tensor& out);

// Small-batch linear engine and gated RMSNorm (kernels/common/linear_ops.cpp).
void small_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::Tensor& out);
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                       const std::optional<at::Tensor>& bias);
std::vector<int64_t> linear_path_counts();
void reset_linear_path_counts();
void gated_rms_norm(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight, double eps, bool sigmoid,
                    at::Tensor& out);

// Kimi Delta Attention (kernels/kda/ops.cpp): gate, chunked prefill, decode with the gate fused in.
std::tuple<at::Tensor, at::Tensor> kda_gate(const at::Tensor& A_log, const at::Tensor& f, const at::Tensor& b,
                                            const at::Tensor& dt_bias, std::optional<double> lower_bound);
void chunk_kda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
               const at::Tensor& beta, at::Tensor& state, const at::Tensor& state_indices,
               const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& has_initial_state, double scale,
               bool use_qk_l2norm, at::Tensor& out);
void fused_recurrent_kda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& A_log,
                         const at::Tensor& dt_bias, const at::Tensor& f, const at::Tensor& b, at::Tensor& state,
                         const at::Tensor& state_indices, const std::optional<at::Tensor>& cu_seqlens, double scale,
                         bool use_qk_l2norm, std::optional<double> lower_bound, at::Tensor& out);

// How many chunk_gated_delta_rule calls ran each schedule: [sequential, chunk_parallel]
// (kernels/gdn/prefill_schedule.cpp).
std::vector<int64_t> prefill_schedule_counts();
// The chunk-parallel schedule's per-phase timers summed over the calls timed while
// VLLM_GDN_CPU_PREFILL_PHASES=1 (layout: PrefillPhase in kernels/gdn/prefill_schedule.h).
std::vector<double> prefill_phase_times(bool reset);

// x *= factor in place (fp32, contiguous): the benchmarks' memory-bandwidth probe.
void stream_scale(at::Tensor& x, double factor);
at::Tensor gemm_probe(bool bf16, double seconds);

// "isa=...;available=...;threads=N" for vllm_gdn_cpu.ops.runtime_info().
std::string runtime_info();

}  // namespace gdn
