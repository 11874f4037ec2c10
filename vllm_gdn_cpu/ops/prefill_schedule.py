"""Which schedule the chunked prefill (chunk_gated_delta_rule) runs, see kernels/gdn/prefill_schedule.h."""

from __future__ import annotations

import torch

from vllm_gdn_cpu import _C  # noqa: F401  (loads the extension, registers torch.ops.vllm_gdn_cpu)

# auto (default) | sequential | chunk_parallel
PREFILL_SCHEDULE_ENV = "VLLM_GDN_CPU_PREFILL_SCHEDULE"


def prefill_schedule_counts() -> dict:
    """How many chunk_gated_delta_rule calls of this process ran each schedule so far."""
    sequential, chunk_parallel = torch.ops.vllm_gdn_cpu.prefill_schedule_counts()
    return {"sequential": sequential, "chunk_parallel": chunk_parallel}
