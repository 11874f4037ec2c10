"""Public Python API of the compiled kernels (``torch.ops.vllm_gdn_cpu.*``), one module per layer
family (``gdn``), the ops they share (``conv``) and the run-time report and probes (``common``).
Plain-torch references of every op live in ``vllm_gdn_cpu.reference``.

Each wrapper only fills defaults and allocates outputs; argument checking happens in C++ (cheap,
and the same for callers that use ``torch.ops`` directly), raising ValueError/TypeError/IndexError
with the argument's name.
"""

from vllm_gdn_cpu.ops.common import GEMM_ENV, ISA_ENV, MAX_ISA_ENV, gemm_probe, runtime_info, stream_scale_
from vllm_gdn_cpu.ops.conv import causal_conv1d
from vllm_gdn_cpu.ops.gdn import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    gdn_decode_step,
    gdn_gating,
)
from vllm_gdn_cpu.ops.mamba2 import mamba2_chunk_scan, mamba2_state_update
from vllm_gdn_cpu.ops.mamba1 import selective_scan, selective_state_update
from vllm_gdn_cpu.ops.prefill_schedule import PREFILL_SCHEDULE_ENV, prefill_schedule_counts
from vllm_gdn_cpu.ops.linear import (
    LINEAR_MAX_M_ENV,
    linear,
    linear_int8,
    linear_path_counts,
    reset_linear_path_counts,
    small_linear,
)
from vllm_gdn_cpu.ops.norm import gated_rms_norm
from vllm_gdn_cpu.ops.kda import chunk_kda, fused_recurrent_kda, kda_gate

__all__ = [
    "GEMM_ENV", "ISA_ENV", "MAX_ISA_ENV", "runtime_info", "stream_scale_", "gemm_probe",
    "causal_conv1d",
    "gdn_gating", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "gdn_decode_step",
    "mamba2_chunk_scan", "mamba2_state_update",
    "selective_scan", "selective_state_update",
    "PREFILL_SCHEDULE_ENV", "prefill_schedule_counts",
    "LINEAR_MAX_M_ENV", "small_linear", "linear", "linear_int8", "linear_path_counts", "reset_linear_path_counts",
    "gated_rms_norm",
    "kda_gate", "chunk_kda", "fused_recurrent_kda",
]
