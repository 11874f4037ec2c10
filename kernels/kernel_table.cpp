// This ISA's entry in the run-time kernel table.
#include "common/params.h"

namespace gdn {
namespace GDN_ISA {

void gdn_gating(const GatingParams&);
void fused_recurrent(const RecurrentParams&);
void chunk_gated_delta_rule(const ChunkParams&);
void causal_conv1d(const ConvParams&);
void stream_scale(float*, int64_t, float);
void gemm_probe(const GemmBackend&, bool, int64_t, int64_t, int64_t, double, double*);
void mamba2_chunk_scan(const Mamba2Params&);
void mamba2_state_update(const Mamba2Params&);
void linear(const LinearParams&);
void gated_rms_norm(const GatedRmsNormParams&);
void kda_gate(const KdaGateParams&);
void chunk_kda(const KdaParams&);
void fused_recurrent_kda(const KdaParams&);
void mamba1_selective_scan(const Mamba1Params&);
void mamba1_state_update(const Mamba1Params&);

#define GDN_STR2(x) #x
#define GDN_STR(x) GDN_STR2(x)
const KernelTable& kernel_table() {
#if defined(__AVX512BF16__)
  constexpr bool kHasBF16Gemm = true;
#else
  constexpr bool kHasBF16Gemm = false;
#endif
  static const KernelTable table{GDN_STR(GDN_ISA), kHasBF16Gemm, &gdn_gating, &fused_recurrent, &chunk_gated_delta_rule,
                                 &causal_conv1d, &stream_scale, &gemm_probe,
                                 &mamba2_chunk_scan, &mamba2_state_update, &linear, &gated_rms_norm,
                                 &kda_gate, &chunk_kda, &fused_recurrent_kda,
                                 &mamba1_selective_scan, &mamba1_state_update};
  return table;
}

}  // namespace GDN_ISA
}  // namespace gdn
