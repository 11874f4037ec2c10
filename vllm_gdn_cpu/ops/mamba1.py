"""Mamba-1 selective-scan ops: varlen prefill (``selective_scan``) and one-token decode
(``selective_state_update``). Plain-torch references: ``vllm_gdn_cpu.reference.mamba1``.

Shapes (token-major): x, dt, z [T, Dm] (Dm = d_inner per TP rank), A [Dm, N] fp32 (N = d_state),
B, C [T, N], D, dt_bias [Dm]; state pool [slots, Dm, N] fp32/bf16/fp16, contiguous within a slot
(vLLM's MambaMixer layout). Per sequence, channel d, token t::

    dt = softplus(dt + dt_bias)          (threshold 20, linear above; only with dt_softplus)
    h  = exp(dt A[d]) (.) h + dt x B ;   y = <h, C> + D x      (then y *= silu(z))

with fp32 accumulation; the state is rounded to its dtype only when stored. A state slot not named
is never written.
"""

from __future__ import annotations

from typing import Optional

import torch

from vllm_gdn_cpu.ops.common import _ops, register_fake, tensor_arguments


@tensor_arguments
def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    state: torch.Tensor,
    state_indices: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    has_initial_state: Optional[torch.Tensor] = None,
    dt_softplus: bool = True,
    checkpoint_offsets: Optional[torch.Tensor] = None,
    checkpoint_slots: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Prefill of a varlen batch; updates ``state[state_indices[i]]`` in place.

    x [T, Dm] fp32/bf16/fp16 (last dim contiguous, rows may be strided); dt [T, Dm] any float dtype
    (raw: before bias / softplus); A [Dm, N] (<= 0); B, C [T, N] in x's dtype or fp32; D, dt_bias
    [Dm] or None; z [T, Dm] in x's dtype or None; state_indices int32 [Nseq] (< 0: padding: skipped,
    output zero, no slot touched); cu_seqlens int32 [Nseq+1]; has_initial_state bool [Nseq] (None:
    all True; False: start from zeros, slot not read); checkpoint_offsets / checkpoint_slots int32
    [Nseq] or None: o > 0 also writes the state after the first o tokens of sequence i into slot
    checkpoint_slots[i] (o == len: the final state). Returns y [T, Dm] in x's dtype (``out`` when
    given); rows past cu_seqlens[-1] are zero.
    """
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _ops.mamba1_selective_scan(
        x, dt, A, B, C, D, z, dt_bias, state, state_indices, cu_seqlens, has_initial_state, bool(dt_softplus),
        checkpoint_offsets, checkpoint_slots, out,
    )
    return out


@tensor_arguments
def selective_state_update(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    state: torch.Tensor,
    state_indices: torch.Tensor,
    *,
    dt_softplus: bool = True,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decode: one token per sequence; updates ``state[state_indices[i]]`` in place. x, dt, z
    [Nseq, Dm], B, C [Nseq, N]; the rest as ``selective_scan``. Returns y [Nseq, Dm] in x's dtype
    (``out`` when given)."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _ops.mamba1_state_update(x, dt, A, B, C, D, z, dt_bias, state, state_indices, bool(dt_softplus), out)
    return out


# Fake (meta) implementations: shapes and dtypes only, for torch.compile / FakeTensor tracing.
@register_fake("mamba1_selective_scan")
def _selective_scan_fake(x, dt, A, B, C, D, z, dt_bias, state, state_indices, cu_seqlens, has_initial_state,
                         dt_softplus, checkpoint_offsets, checkpoint_slots, out):
    return None


@register_fake("mamba1_state_update")
def _state_update_fake(x, dt, A, B, C, D, z, dt_bias, state, state_indices, dt_softplus, out):
    return None
