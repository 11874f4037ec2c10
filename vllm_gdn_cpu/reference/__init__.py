"""Plain-torch references of every op in ``vllm_gdn_cpu.ops``, one module per layer family.

Token-by-token or otherwise easy to read, they define what the compiled kernels must compute. They
accept any float dtype and compute in ``compute_dtype`` (float64 for tests), so a test can compare a
fast kernel against a result that carries no rounding error of its own.
"""

from vllm_gdn_cpu.reference.conv import causal_conv1d_ref
from vllm_gdn_cpu.reference.gdn import (
    L2NORM_EPS,
    chunk_gated_delta_rule_chunked_ref,
    chunk_gated_delta_rule_ref,
    fused_recurrent_gated_delta_rule_ref,
    gdn_gating_ref,
    l2norm,
    softplus,
)
from vllm_gdn_cpu.reference.kda import chunk_kda_ref, fused_recurrent_kda_ref, kda_gate_ref
from vllm_gdn_cpu.reference.linear import linear_int8_ref, linear_ref
from vllm_gdn_cpu.reference.norm import gated_rms_norm_ref
from vllm_gdn_cpu.reference.mamba1 import mamba1_dt, selective_scan_ref, selective_state_update_ref
from vllm_gdn_cpu.reference.mamba2 import (
    mamba2_chunk_scan_ref,
    mamba2_chunked_ref,
    mamba2_dt,
    mamba2_state_update_ref,
)

__all__ = [
    "causal_conv1d_ref", "L2NORM_EPS", "l2norm", "softplus", "gdn_gating_ref", "chunk_gated_delta_rule_ref",
    "fused_recurrent_gated_delta_rule_ref", "chunk_gated_delta_rule_chunked_ref",
    "mamba2_dt", "mamba2_chunk_scan_ref", "mamba2_state_update_ref", "mamba2_chunked_ref",
    "mamba1_dt", "selective_scan_ref", "selective_state_update_ref",
    "linear_ref", "linear_int8_ref", "gated_rms_norm_ref",
    "kda_gate_ref", "chunk_kda_ref", "fused_recurrent_kda_ref",
]
