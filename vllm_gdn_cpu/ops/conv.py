"""Depthwise causal conv1d over a varlen batch with a per-slot history (shared by the families)."""

from __future__ import annotations

from typing import Optional

import torch

from vllm_gdn_cpu.ops.common import _ops, register_fake, tensor_arguments


@tensor_arguments
def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    conv_state: torch.Tensor,
    state_indices: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    has_initial_state: Optional[torch.Tensor] = None,
    silu: bool = True,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Depthwise causal conv1d (+ SiLU) of a varlen batch, continuing from and updating conv_state.

    x [T, D] (rows may be strided); weight [D, W] (2 <= W <= 8); bias [D] or None; conv_state
    [slots, W-1, D] with any strides (vLLM's dim-first cache is a transposed view): the last W-1
    inputs of each sequence, oldest first; state_indices int32 [N] (< 0: padding, history zero,
    state untouched); cu_seqlens int32 [N+1]; has_initial_state bool [N] (None: all True).
    Decode is the case of sequences of length 1. Returns [T, D] in x's dtype (fp32 accumulation).
    """
    o = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    _ops.causal_conv1d(x, weight, bias, conv_state, state_indices, cu_seqlens, has_initial_state, bool(silu), o)
    return o


@register_fake("causal_conv1d")
def _conv_fake(x, weight, bias, conv_state, state_indices, cu_seqlens, has_initial_state, silu, out):
    return None
