"""Mamba2 (SSD) ops: chunked prefill (``mamba2_chunk_scan``) and one-token decode
(``mamba2_state_update``). Plain-torch references: ``vllm_gdn_cpu.reference.mamba2``.

Shapes: H heads of dim P, G groups of B/C with d_state N (head h reads group h // (H // G)); state
[slots, H, P, N] (vLLM's MambaMixer2 layout), fp32/bf16/fp16, contiguous within a slot. Per
sequence, head, token::

    dt = clamp(softplus(dt + dt_bias), *dt_limit)      (softplus: threshold 20, only with dt_softplus)
    h  = exp(A dt) h + dt x B^T ;   y = h C + D x      (then y *= silu(z))

with fp32 accumulation. A state slot not named is never written.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from vllm_gdn_cpu.ops.common import _ops, register_fake, tensor_arguments


def _limits(dt_limit) -> tuple[float, float]:
    lo, hi = dt_limit
    return float(lo), float(hi)


@tensor_arguments
def mamba2_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    state: torch.Tensor,
    state_indices: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    has_initial_state: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    checkpoint_offsets: Optional[torch.Tensor] = None,
    checkpoint_slots: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Chunked prefill of a varlen batch; updates ``state[state_indices[i]]`` in place.

    x [T, H, P] fp32/bf16/fp16 (last dim contiguous); dt [T, H] any float dtype (raw); A [H] (<= 0);
    B, C [T, G, N] in x's dtype; D, dt_bias [H] or None; state_indices int32 [Nseq] (< 0: padding:
    skipped, output zero, no slot touched); cu_seqlens int32 [Nseq+1]; has_initial_state bool [Nseq]
    (None: all True; False: start from zeros, slot not read); z [T, H, P] or None;
    checkpoint_offsets / checkpoint_slots int32 [Nseq] or None: o > 0 also writes the state after
    the first o tokens of sequence i into slot checkpoint_slots[i] (o == len: the final state).
    Returns y [T, H, P] in x's dtype (``out`` when given); rows past cu_seqlens[-1] are zero.
    """
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    lo, hi = _limits(dt_limit)
    _ops.mamba2_chunk_scan(
        x, dt, A, B, C, D, dt_bias, state, state_indices, cu_seqlens, has_initial_state, z,
        bool(dt_softplus), lo, hi, checkpoint_offsets, checkpoint_slots, out,
    )
    return out


@tensor_arguments
def mamba2_state_update(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    state: torch.Tensor,
    state_indices: torch.Tensor,
    *,
    z: Optional[torch.Tensor] = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decode: one token per sequence (selective_state_update semantics); updates
    ``state[state_indices[i]]`` in place. x [Nseq, H, P], dt [Nseq, H], B, C [Nseq, G, N]; the rest
    as ``mamba2_chunk_scan``. Returns y [Nseq, H, P] in x's dtype (``out`` when given)."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    lo, hi = _limits(dt_limit)
    _ops.mamba2_state_update(x, dt, A, B, C, D, dt_bias, state, state_indices, z, bool(dt_softplus), lo, hi, out)
    return out


# Fake (meta) implementations: shapes and dtypes only, for torch.compile / FakeTensor tracing.
@register_fake("mamba2_chunk_scan")
def _chunk_scan_fake(x, dt, A, B, C, D, dt_bias, state, state_indices, cu_seqlens, has_initial_state, z,
                     dt_softplus, dt_min, dt_max, checkpoint_offsets, checkpoint_slots, out):
    return None


@register_fake("mamba2_state_update")
def _state_update_fake(x, dt, A, B, C, D, dt_bias, state, state_indices, z, dt_softplus, dt_min, dt_max, out):
    return None
