// Every per-ISA kernel, once: X(name, parameter types...). The list generates the run-time table's
// members (KernelTable, common/params.h) and each ISA's declarations and table entry
// (kernels/kernel_table.cpp); a kernel is defined as gdn::GDN_ISA::name in its family's folder.
#pragma once

#define GDN_KERNEL_LIST(X)                                                                  \
  /* Gated DeltaNet (kernels/gdn) */                                                        \
  X(gdn_gating, const GatingParams&)                                                        \
  X(fused_recurrent, const RecurrentParams&)                                                \
  X(chunk_gated_delta_rule, const ChunkParams&)                                             \
  /* shared by the families (kernels/common) */                                             \
  X(causal_conv1d, const ConvParams&)                                                       \
  X(linear, const LinearParams&)                                                            \
  X(gated_rms_norm, const GatedRmsNormParams&)                                              \
  /* benchmark probes (kernels/common/stream_scale.cpp, gemm_probe.cpp) */                  \
  X(stream_scale, float* x, int64_t n, float factor)                                        \
  X(gemm_probe, const GemmBackend& gemm, bool bf16, int64_t M, int64_t N, int64_t K, double seconds, \
    double* gflops_per_thread)                                                              \
  /* Mamba2 / SSD (kernels/mamba2) */                                                       \
  X(mamba2_chunk_scan, const Mamba2Params&)                                                 \
  X(mamba2_state_update, const Mamba2Params&)                                               \
  /* Kimi Delta Attention (kernels/kda) */                                                  \
  X(kda_gate, const KdaGateParams&)                                                         \
  X(chunk_kda, const KdaParams&)                                                            \
  X(fused_recurrent_kda, const KdaParams&)                                                  \
  /* Mamba-1 selective scan (kernels/mamba1) */                                             \
  X(mamba1_selective_scan, const Mamba1Params&)                                             \
  X(mamba1_state_update, const Mamba1Params&)
