"""Kimi Delta Attention (KDA, Kimi-Linear) ops: the gate, the chunked prefill and the decode
recurrence with the gate fused in. KDA is the gated delta rule with a per-channel decay
g_t in R^K per head (GDN's is one scalar per head); q, k, v have the same number of heads H.
"""

from __future__ import annotations

from typing import Optional

import torch

from vllm_gdn_cpu.ops.common import _ops, default_scale, register_fake, tensor_arguments


def _opt_float(x: Optional[float]) -> Optional[float]:
    return None if x is None else float(x)


@tensor_arguments
def kda_gate(
    A_log: torch.Tensor,
    f: torch.Tensor,
    b: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    lower_bound: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """g = -exp(A_log[h]) * softplus(f + dt_bias) (softplus linear above 20), or with
    ``lower_bound`` lb: g = lb * sigmoid(exp(A_log[h]) * (f + dt_bias)); beta = sigmoid(b).

    f [T, H, K], b [T, H] any float dtype; A_log [H]; dt_bias [H*K]. Returns float32 g [T, H, K]
    and beta [T, H].
    """
    return _ops.kda_gate(A_log, f, b, dt_bias, _opt_float(lower_bound))



def _out_like(q: torch.Tensor, v: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    return out if out is not None else torch.empty(v.shape, dtype=q.dtype, device=q.device)


@tensor_arguments
def chunk_kda(
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
    """Chunked KDA prefill of a varlen batch; updates ``state[state_indices[i]]`` in place.

    q, k [T, H, K]; v [T, H, V]; g float32 [T, H, K] (log-decays, from ``kda_gate``); beta float32
    [T, H]; state [slots, H, K, V] (fp32/bf16/fp16); state_indices int32 [N] (< 0: padding, skipped,
    output zeroed); cu_seqlens int32 [N+1]; has_initial_state bool [N] (None: all True).
    Returns o [T, H, V] in q's dtype (or ``out``).
    """
    o = _out_like(q, v, out)
    _ops.chunk_kda(q, k, v, g, beta, state, state_indices, cu_seqlens, has_initial_state,
                   default_scale(q.shape[-1], scale), bool(use_qk_l2norm), o)
    return o


@tensor_arguments
def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    f: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
    state_indices: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
    lower_bound: Optional[float] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """KDA decode step(s) with the gate (``kda_gate``'s, from f [T, H, K] and b [T, H]) computed
    inside; updates ``state[state_indices[i]]`` in place. Same layouts as ``chunk_kda``;
    cu_seqlens None means one token per sequence (T == N), else each sequence's tokens run in order.
    """
    o = _out_like(q, v, out)
    _ops.fused_recurrent_kda(q, k, v, A_log, dt_bias, f, b, state, state_indices, cu_seqlens,
                             default_scale(q.shape[-1], scale), bool(use_qk_l2norm), _opt_float(lower_bound), o)
    return o


@register_fake("kda_gate")
def _kda_gate_fake(A_log, f, b, dt_bias, lower_bound):
    return f.new_empty(f.shape, dtype=torch.float32), b.new_empty(b.shape, dtype=torch.float32)


@register_fake("chunk_kda")
def _chunk_kda_fake(q, k, v, g, beta, state, state_indices, cu_seqlens, has_initial_state, scale,
                    use_qk_l2norm, out):
    return None


@register_fake("fused_recurrent_kda")
def _fused_recurrent_kda_fake(q, k, v, A_log, dt_bias, f, b, state, state_indices, cu_seqlens, scale,
                              use_qk_l2norm, lower_bound, out):
    return None
