"""Plain-torch reference implementations of the GDN ops.

Token-by-token and easy to read: these define what the compiled kernels in ``vllm_gdn_cpu.ops``
must compute. They accept any float dtype and compute in ``compute_dtype`` (float64 for tests), so a
test can compare a fast kernel against a result that carries no rounding error of its own.

Math (flash-linear-attention's gated delta rule), per token and per value head::

    S = exp(g) * S
    S = S + k (x) (beta * (v - S^T k))
    o = scale * S^T q

with S of shape [K, V], q and k l2-normalised first when ``use_qk_l2norm``.
Value head h reads query/key head ``h // (Hv // Hk)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dim (the convention of FLA and HF Qwen3-Next)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def softplus(x: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    return F.softplus(x, beta=beta, threshold=threshold)


def gdn_gating_ref(
    A_log: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    softplus_beta: float = 1.0,
    softplus_threshold: float = 20.0,
    allow_neg_eigval: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b) (x2 with negative eigenvalues)."""
    cd = compute_dtype
    g = -A_log.to(cd).exp() * softplus(a.to(cd) + dt_bias.to(cd), softplus_beta, softplus_threshold)
    beta = b.to(cd).sigmoid()
    if allow_neg_eigval:
        beta = beta * 2.0
    return g, beta


def _sequence_bounds(cu_seqlens: Optional[torch.Tensor], T: int, N: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(i, i + 1) for i in range(N)]
    cu = cu_seqlens.tolist()
    return [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _recurrence(q, k, v, g, beta, S, scale, use_qk_l2norm):
    """Runs one sequence of one batch entry through the recurrence; S [Hv, K, V] is updated in place.

    q, k [L, Hk, K], v [L, Hv, V], g, beta [L, Hv]; all already in the compute dtype.
    Returns o [L, Hv, V].
    """
    L, Hk, _ = q.shape
    Hv = v.shape[1]
    ratio = Hv // Hk
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q.repeat_interleave(ratio, dim=1) * scale
    k = k.repeat_interleave(ratio, dim=1)
    out = torch.empty_like(v)
    for t in range(L):
        S.mul_(g[t].exp()[:, None, None])
        kS = torch.einsum("hk,hkv->hv", k[t], S)
        delta = beta[t][:, None] * (v[t] - kS)
        S.add_(torch.einsum("hk,hv->hkv", k[t], delta))
        out[t] = torch.einsum("hk,hkv->hv", q[t], S)
    return out


def chunk_gated_delta_rule_ref(
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
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference prefill. Updates ``state`` in place (in its own dtype) and returns o in q's dtype.

    The reference runs the exact token recurrence; the chunked algorithm of the kernel is an exact
    rewrite of it, so both must agree up to rounding.
    """
    cd = compute_dtype
    T, Hk, K = q.shape
    Hv, V = v.shape[1], v.shape[2]
    scale = K**-0.5 if scale is None else scale
    N = state_indices.shape[0]
    out = torch.zeros(T, Hv, V, dtype=q.dtype)
    for i, (bos, eos) in enumerate(_sequence_bounds(cu_seqlens, T, N)):
        slot = int(state_indices[i])
        if slot < 0:
            continue
        start = has_initial_state is None or bool(has_initial_state[i])
        S = state[slot].to(cd).clone() if start else torch.zeros(Hv, K, V, dtype=cd)
        o = _recurrence(
            q[bos:eos].to(cd), k[bos:eos].to(cd), v[bos:eos].to(cd),
            g[bos:eos].to(cd), beta[bos:eos].to(cd), S, scale, use_qk_l2norm,
        )
        out[bos:eos] = o.to(q.dtype)
        state[slot] = S.to(state.dtype)
    return out


def fused_recurrent_gated_delta_rule_ref(
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
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference decode with the gating fused in (cu_seqlens None: one token per sequence)."""
    cd = compute_dtype
    g, beta = gdn_gating_ref(
        A_log, a, b, dt_bias, softplus_beta=softplus_beta, softplus_threshold=softplus_threshold,
        allow_neg_eigval=allow_neg_eigval, compute_dtype=cd,
    )
    T, Hk, K = q.shape
    Hv, V = v.shape[1], v.shape[2]
    scale = K**-0.5 if scale is None else scale
    N = state_indices.shape[0]
    out = torch.zeros(T, Hv, V, dtype=q.dtype)
    for i, (bos, eos) in enumerate(_sequence_bounds(cu_seqlens, T, N)):
        slot = int(state_indices[i])
        if slot < 0:
            continue
        S = state[slot].to(cd).clone()
        o = _recurrence(
            q[bos:eos].to(cd), k[bos:eos].to(cd), v[bos:eos].to(cd),
            g[bos:eos], beta[bos:eos], S, scale, use_qk_l2norm,
        )
        out[bos:eos] = o.to(q.dtype)
        state[slot] = S.to(state.dtype)
    return out


def chunk_gated_delta_rule_chunked_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    S: torch.Tensor,
    *,
    scale: float,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """The chunked (WY / UT-transform) form of the same recurrence for ONE sequence, in plain torch.

    q, k [L, Hv, K] (heads already expanded), v [L, Hv, V], g, beta [L, Hv], S [Hv, K, V] updated
    in place. Documents the algorithm the C++ prefill kernel implements, and lets tests check that
    the rewrite is exact (it is compared against ``_recurrence`` in float64).
    """
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * scale
    L = q.shape[0]
    out = torch.empty_like(v)
    for c0 in range(0, L, chunk_size):
        c1 = min(c0 + chunk_size, L)
        qc, kc, vc = q[c0:c1].transpose(0, 1), k[c0:c1].transpose(0, 1), v[c0:c1].transpose(0, 1)
        gc = g[c0:c1].transpose(0, 1).cumsum(-1)  # [H, c]
        bc = beta[c0:c1].transpose(0, 1)
        n = c1 - c0
        decay = (gc[:, :, None] - gc[:, None, :]).tril().exp().tril()  # exp(gc_i - gc_j), j <= i
        strict = torch.ones(n, n, dtype=torch.bool).tril(-1)
        Lmat = (bc[:, :, None] * (kc @ kc.transpose(1, 2)) * decay) * strict  # beta_i k_i.k_j decay
        eye = torch.eye(n, dtype=q.dtype).expand_as(Lmat)
        Tinv = torch.linalg.solve_triangular(eye + Lmat, eye, upper=False)  # (I + L)^-1
        u = Tinv @ (vc * bc[..., None])
        w = Tinv @ (kc * (bc * gc.exp())[..., None])
        v_new = u - w @ S
        P = (qc @ kc.transpose(1, 2)) * decay  # lower incl. diagonal
        oc = (qc * gc.exp()[..., None]) @ S + P @ v_new
        out[c0:c1] = oc.transpose(0, 1)
        g_last = gc[:, -1]
        kd = kc * (g_last[:, None] - gc).exp()[..., None]
        S.mul_(g_last.exp()[:, None, None]).add_(kd.transpose(1, 2) @ v_new)
    return out
