"""Gated DeltaNet ops: gating, chunked prefill, decode recurrence and the fused decode step."""

from __future__ import annotations

from typing import Optional

import torch

from vllm_gdn_cpu.ops.common import _ops, default_scale, register_fake, tensor_arguments


@tensor_arguments
def gdn_gating(
    A_log: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    softplus_beta: float = 1.0,
    softplus_threshold: float = 20.0,
    allow_neg_eigval: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b) (x2 if allow_neg_eigval).

    a, b: [T, Hv] any float dtype; A_log, dt_bias: [Hv]. Returns float32 (g, beta), each [T, Hv].
    """
    return _ops.gdn_gating(
        A_log, a, b, dt_bias, float(softplus_beta), float(softplus_threshold), bool(allow_neg_eigval)
    )


def _out_like(q: torch.Tensor, v: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is not None:
        return out
    return torch.empty(v.shape[0], v.shape[1], v.shape[2], dtype=q.dtype, device=q.device)



@tensor_arguments
def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    state_indices: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    has_initial_state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Chunked prefill of a varlen batch; updates ``state[state_indices[i]]`` in place.

    q, k [T, Hk, K]; v [T, Hv, V]; g, beta float32 [T, Hv]; state [slots, Hv, K, V] (fp32/bf16/fp16);
    state_indices int32 [N] (< 0: padding, skipped, output zeroed); cu_seqlens int32 [N+1];
    has_initial_state bool [N] (None: all True). Returns o [T, Hv, V] in q's dtype (or ``out``).
    """
    o = _out_like(q, v, out)
    _ops.chunk_gated_delta_rule(
        q, k, v, g, beta, state, state_indices, cu_seqlens, has_initial_state,
        default_scale(q.shape[-1], scale), bool(use_qk_l2norm), o,
    )
    return o


@tensor_arguments
def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
    state_indices: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
    allow_neg_eigval: bool = False,
    softplus_beta: float = 1.0,
    softplus_threshold: float = 20.0,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decode step(s) with the gating fused in; updates ``state[state_indices[i]]`` in place.

    Same layouts as ``chunk_gated_delta_rule``; a, b [T, Hv]; cu_seqlens None means one token per
    sequence (T == N).
    """
    o = _out_like(q, v, out)
    _ops.fused_recurrent_gated_delta_rule(
        q, k, v, A_log, dt_bias, a, b, state, state_indices, cu_seqlens,
        default_scale(q.shape[-1], scale), bool(use_qk_l2norm), bool(allow_neg_eigval),
        float(softplus_beta), float(softplus_threshold), o,
    )
    return o


@tensor_arguments
def gdn_decode_step(
    mixed_qkv: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    conv_state: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ssm_state: torch.Tensor,
    state_indices: torch.Tensor,
    *,
    num_k_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
    allow_neg_eigval: bool = False,
    softplus_beta: float = 1.0,
    softplus_threshold: float = 20.0,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One GDN layer's decode core in one call: conv1d state update + SiLU over mixed_qkv [B, D]
    (channels q | k | v), split into heads, l2norm, gating and the recurrence (one token per
    sequence). Same as causal_conv1d followed by fused_recurrent_gated_delta_rule. Returns [B, Hv, V].
    """
    Hv = a.shape[1]
    o = out if out is not None else torch.empty(mixed_qkv.shape[0], Hv, head_v_dim, dtype=mixed_qkv.dtype)
    _ops.gdn_decode_step(
        mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, a, b, ssm_state, state_indices,
        int(num_k_heads), int(head_k_dim), int(head_v_dim), default_scale(int(head_k_dim), scale),
        bool(use_qk_l2norm), bool(allow_neg_eigval), float(softplus_beta), float(softplus_threshold), o,
    )
    return o


# Fake (meta) implementations: shapes and dtypes only, for torch.compile / FakeTensor tracing.
@register_fake("gdn_gating")
def _gdn_gating_fake(A_log, a, b, dt_bias, softplus_beta, softplus_threshold, allow_neg_eigval):
    return a.new_empty(a.shape, dtype=torch.float32), a.new_empty(a.shape, dtype=torch.float32)


@register_fake("chunk_gated_delta_rule")
def _chunk_fake(q, k, v, g, beta, state, state_indices, cu_seqlens, has_initial_state, scale,
                use_qk_l2norm, out):
    return None


@register_fake("fused_recurrent_gated_delta_rule")
def _recurrent_fake(q, k, v, A_log, dt_bias, a, b, state, state_indices, cu_seqlens, scale,
                    use_qk_l2norm, allow_neg_eigval, softplus_beta, softplus_threshold, out):
    return None


@register_fake("gdn_decode_step")
def _decode_step_fake(mixed_qkv, conv_weight, conv_bias, conv_state, A_log, dt_bias, a, b, ssm_state,
                      state_indices, num_k_heads, head_k_dim, head_v_dim, scale, use_qk_l2norm,
                      allow_neg_eigval, softplus_beta, softplus_threshold, out):
    return None
