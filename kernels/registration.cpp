// The one place where ops are registered with the PyTorch dispatcher. Mutated arguments are
// marked (a!) so torch.compile / functionalization see the in-place state updates.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(vllm_gdn_cpu, m) {
  m.def(
      "gdn_gating(Tensor A_log, Tensor a, Tensor b, Tensor dt_bias, float softplus_beta, "
      "float softplus_threshold, bool allow_neg_eigval) -> (Tensor, Tensor)");
  m.def(
      "chunk_gated_delta_rule(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor(a!) state, "
      "Tensor state_indices, Tensor cu_seqlens, Tensor? has_initial_state, float scale, bool use_qk_l2norm, "
      "Tensor(b!) out) -> ()");
  m.def(
      "fused_recurrent_gated_delta_rule(Tensor q, Tensor k, Tensor v, Tensor A_log, Tensor dt_bias, Tensor a, "
      "Tensor b, Tensor(a!) state, Tensor state_indices, Tensor? cu_seqlens, float scale, bool use_qk_l2norm, "
      "bool allow_neg_eigval, float softplus_beta, float softplus_threshold, Tensor(b!) out) -> ()");
  m.def(
      "causal_conv1d(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) conv_state, Tensor state_indices, "
      "Tensor cu_seqlens, Tensor? has_initial_state, bool silu, Tensor(b!) out) -> ()");
  m.def(
      "gdn_decode_step(Tensor mixed_qkv, Tensor conv_weight, Tensor? conv_bias, Tensor(a!) conv_state, "
      "Tensor A_log, Tensor dt_bias, Tensor a, Tensor b, Tensor(b!) ssm_state, Tensor state_indices, "
      "int num_k_heads, int head_k_dim, int head_v_dim, float scale, bool use_qk_l2norm, bool allow_neg_eigval, "
      "float softplus_beta, float softplus_threshold, Tensor(c!) out) -> ()");
  m.def(
      "mamba2_chunk_scan(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? dt_bias, "
      "Tensor(a!) state, Tensor state_indices, Tensor cu_seqlens, Tensor? has_initial_state, Tensor? z, "
      "bool dt_softplus, float dt_min, float dt_max, Tensor? checkpoint_offsets, Tensor? checkpoint_slots, "
      "Tensor(b!) out) -> ()");
  m.def(
      "mamba2_state_update(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? dt_bias, "
      "Tensor(a!) state, Tensor state_indices, Tensor? z, bool dt_softplus, float dt_min, float dt_max, "
      "Tensor(b!) out) -> ()");
  m.def(
      "mamba1_selective_scan(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? dt_bias, Tensor(a!) state, Tensor state_indices, Tensor cu_seqlens, Tensor? has_initial_state, "
      "bool dt_softplus, Tensor? checkpoint_offsets, Tensor? checkpoint_slots, Tensor(b!) out) -> ()");
  m.def(
      "mamba1_state_update(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? dt_bias, Tensor(a!) state, Tensor state_indices, bool dt_softplus, Tensor(b!) out) -> ()");
  m.def("small_linear(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor");
  m.def("linear_path_counts() -> int[]");
  m.def("reset_linear_path_counts() -> ()");
  m.def("gated_rms_norm(Tensor x, Tensor z, Tensor weight, float eps, bool sigmoid, Tensor(a!) out) -> ()");
  m.def("stream_scale(Tensor(a!) x, float factor) -> ()");
  m.def("gemm_probe(bool bf16, float seconds) -> Tensor");
  m.def("runtime_info() -> str");
  m.def("prefill_schedule_counts() -> int[]");
  m.def("prefill_phase_times(bool reset) -> float[]");
  m.def("kda_gate(Tensor A_log, Tensor f, Tensor b, Tensor dt_bias, float? lower_bound) -> (Tensor, Tensor)");
  m.def(
      "chunk_kda(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor(a!) state, Tensor state_indices, "
      "Tensor cu_seqlens, Tensor? has_initial_state, float scale, bool use_qk_l2norm, Tensor(b!) out) -> ()");
  m.def(
      "fused_recurrent_kda(Tensor q, Tensor k, Tensor v, Tensor A_log, Tensor dt_bias, Tensor f, Tensor b, "
      "Tensor(a!) state, Tensor state_indices, Tensor? cu_seqlens, float scale, bool use_qk_l2norm, "
      "float? lower_bound, Tensor(b!) out) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_gdn_cpu, CPU, m) {
  m.impl("gdn_gating", &gdn::gdn_gating);
  m.impl("chunk_gated_delta_rule", &gdn::chunk_gated_delta_rule);
  m.impl("fused_recurrent_gated_delta_rule", &gdn::fused_recurrent_gated_delta_rule);
  m.impl("causal_conv1d", &gdn::causal_conv1d);
  m.impl("gdn_decode_step", &gdn::gdn_decode_step);
  m.impl("mamba2_chunk_scan", &gdn::mamba2_chunk_scan);
  m.impl("mamba2_state_update", &gdn::mamba2_state_update);
  m.impl("mamba1_selective_scan", &gdn::mamba1_selective_scan);
  m.impl("mamba1_state_update", &gdn::mamba1_state_update);
  m.impl("small_linear", &gdn::small_linear);
  m.impl("linear", &gdn::linear);
  m.impl("linear_int8", &gdn::linear_int8);
  m.impl("gated_rms_norm", &gdn::gated_rms_norm);
  m.impl("stream_scale", &gdn::stream_scale);
  m.impl("kda_gate", &gdn::kda_gate);
  m.impl("chunk_kda", &gdn::chunk_kda);
  m.impl("fused_recurrent_kda", &gdn::fused_recurrent_kda);
}

TORCH_LIBRARY_IMPL(vllm_gdn_cpu, CompositeExplicitAutograd, m) {
  m.impl("runtime_info", &gdn::runtime_info);
  m.impl("prefill_schedule_counts", &gdn::prefill_schedule_counts);
  m.impl("prefill_phase_times", &gdn::prefill_phase_times);
  m.impl("gemm_probe", &gdn::gemm_probe);  // takes no tensor: nothing to dispatch on
  m.impl("linear_path_counts", &gdn::linear_path_counts);
  m.impl("reset_linear_path_counts", &gdn::reset_linear_path_counts);
}

// Importing vllm_gdn_cpu._C registers the ops above; the module itself has no attributes.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
