"""Plain-torch references of the KDA (Kimi Delta Attention) ops, float64-capable.

Per token and head, with S of shape [K, V] and a per-channel decay g in R^K::

    S = exp(g)[:, None] * S
    S = S + k (x) (beta * (v - S^T k))
    o = scale * S^T q

with q and k l2-normalised first (x / sqrt(sum x^2 + 1e-6)) when ``use_qk_l2norm``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vllm_gdn_cpu.reference.gdn import _sequence_bounds, l2norm


def kda_gate_ref(
    A_log: torch.Tensor,
    f: torch.Tensor,
    b: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    lower_bound: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """g [T, H, K] and beta [T, H]; see ``vllm_gdn_cpu.ops.kda_gate``."""
    cd = compute_dtype
    T, H, K = f.shape
    A = A_log.to(cd).reshape(H).exp()[:, None]
    x = f.to(cd) + dt_bias.to(cd).reshape(H, K)
    if lower_bound is None:
        g = -A * F.softplus(x, beta=1.0, threshold=20.0)
    else:
        g = lower_bound * torch.sigmoid(A * x)
    return g, b.to(cd).sigmoid()


def _recurrence(q, k, v, g, beta, S, scale, use_qk_l2norm):
    """One sequence; q, k [L, H, K], v [L, H, V], g [L, H, K], beta [L, H]; S [H, K, V] updated in
    place. Returns o [L, H, V]."""
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * scale
    out = torch.empty_like(v)
    for t in range(q.shape[0]):
        S.mul_(g[t].exp()[:, :, None])
        kS = torch.einsum("hk,hkv->hv", k[t], S)
        S.add_(torch.einsum("hk,hv->hkv", k[t], beta[t][:, None] * (v[t] - kS)))
        out[t] = torch.einsum("hk,hkv->hv", q[t], S)
    return out


def chunk_kda_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    state_indices: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    *,
    has_initial_state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of ``chunk_kda`` (the exact token recurrence). Updates ``state`` in place (in its
    own dtype) and returns o in q's dtype. cu_seqlens None: sequence i is token i."""
    cd = compute_dtype
    T, H, K = q.shape
    V = v.shape[2]
    scale = K**-0.5 if scale is None else scale
    N = state_indices.shape[0]
    out = torch.zeros(T, H, V, dtype=q.dtype)
    for i, (bos, eos) in enumerate(_sequence_bounds(cu_seqlens, T, N)):
        slot = int(state_indices[i])
        if slot < 0:
            continue
        start = has_initial_state is None or bool(has_initial_state[i])
        S = state[slot].to(cd).clone() if start else torch.zeros(H, K, V, dtype=cd)
        o = _recurrence(q[bos:eos].to(cd), k[bos:eos].to(cd), v[bos:eos].to(cd), g[bos:eos].to(cd),
                        beta[bos:eos].to(cd), S, scale, use_qk_l2norm)
        out[bos:eos] = o.to(q.dtype)
        state[slot] = S.to(state.dtype)
    return out


def fused_recurrent_kda_ref(
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
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of ``fused_recurrent_kda``: the gate, then the token recurrence."""
    g, beta = kda_gate_ref(A_log, f, b, dt_bias, lower_bound=lower_bound, compute_dtype=compute_dtype)
    return chunk_kda_ref(q, k, v, g, beta, state, state_indices, cu_seqlens, scale=scale,
                         use_qk_l2norm=use_qk_l2norm, compute_dtype=compute_dtype)
