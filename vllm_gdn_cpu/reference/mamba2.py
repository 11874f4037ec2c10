"""Plain-torch references of the Mamba2 (SSD) ops: the token-by-token recurrence and the chunked form.

Math per sequence, head h (group ``h // (H // G)``), token t, state h_t of shape [P, N]::

    dt_t = clamp(softplus(dt_t + dt_bias), lo, hi)        (softplus only with dt_softplus)
    h_t  = exp(A * dt_t) * h_{t-1} + dt_t * x_t B_t^T
    y_t  = h_t C_t + D * x_t                                (then * silu(z_t) when z is given)

``mamba2_chunk_scan_ref`` / ``mamba2_state_update_ref`` loop over tokens (the definition);
``mamba2_chunked_ref`` computes one sequence with the chunked SSD form that the C++ kernel runs
(per chunk: intra-chunk (C B^T masked by decays) (dt x), the carried state's contribution, the
chunk state update), so the algorithm itself is tested against the recurrence.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def mamba2_dt(
    dt: torch.Tensor,
    dt_bias: Optional[torch.Tensor],
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The step sizes [T, H]: softplus(dt + dt_bias) (threshold 20, linear above), clamped to dt_limit."""
    d = dt.to(compute_dtype)
    if dt_bias is not None:
        d = d + dt_bias.to(compute_dtype)
    if dt_softplus:
        d = F.softplus(d, beta=1.0, threshold=20.0)
    return d.clamp(min=dt_limit[0], max=dt_limit[1])


def _per_group(t: torch.Tensor, H: int) -> torch.Tensor:
    """[L, G, N] -> [L, H, N] (head h reads group h // (H // G))."""
    return t.repeat_interleave(H // t.shape[1], dim=1)


def _recurrence(x, dt, A, B, C, S, offsets=()):
    """One sequence, token by token, all in the compute dtype: x [L, H, P], dt [L, H], A [H],
    B/C [L, H, N] (per head), S [H, P, N] updated in place. Returns (y [L, H, P] without D/z,
    {o: copy of S after the first o tokens for o in offsets})."""
    y = torch.empty_like(x)
    saved = {}
    for t in range(x.shape[0]):
        if t in offsets:
            saved[t] = S.clone()
        dA = torch.exp(A * dt[t])  # [H]
        S.mul_(dA[:, None, None]).add_((dt[t][:, None] * x[t])[:, :, None] * B[t][:, None, :])
        y[t] = torch.einsum("hpn,hn->hp", S, C[t])
    if x.shape[0] in offsets:
        saved[x.shape[0]] = S.clone()
    return y, saved


def _finish(y, x, D, z, cd):
    if D is not None:
        y = y + D.to(cd)[None, :, None] * x
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y


def mamba2_chunk_scan_ref(
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
    compute_dtype: torch.dtype = torch.float32,
    chunked: Optional[int] = None,
) -> torch.Tensor:
    """Reference of ``ops.mamba2_chunk_scan`` (same arguments). Updates ``state`` in place (in its
    dtype) and returns y [T, H, P] in ``compute_dtype``. PAD entries (state_indices < 0) get zero
    output and touch no slot; tokens past cu_seqlens[-1] get zero output. With ``chunked=L`` each
    sequence runs through ``mamba2_chunked_ref`` with chunks of L tokens instead of the recurrence."""
    cd = compute_dtype
    T, H, P = x.shape
    xc = x.to(cd)
    dtc = mamba2_dt(dt, dt_bias, dt_softplus, dt_limit, cd)
    Ac = A.to(cd)
    Bc, Cc = _per_group(B.to(cd), H), _per_group(C.to(cd), H)
    y = torch.zeros(T, H, P, dtype=cd)
    cu = cu_seqlens.tolist()
    for i, slot in enumerate(state_indices.tolist()):
        if slot < 0:
            continue
        s, e = cu[i], cu[i + 1]
        init = has_initial_state is None or bool(has_initial_state[i])
        S = state[slot].to(cd) if init else torch.zeros(state.shape[1:], dtype=cd)
        o = 0 if checkpoint_offsets is None else int(checkpoint_offsets[i])
        offsets = (o,) if o > 0 else ()
        if chunked:
            yi, saved = mamba2_chunked_ref(xc[s:e], dtc[s:e], Ac, Bc[s:e], Cc[s:e], S, chunk=chunked,
                                           offsets=offsets)
        else:
            yi, saved = _recurrence(xc[s:e], dtc[s:e], Ac, Bc[s:e], Cc[s:e], S, offsets)
        y[s:e] = yi
        state[slot] = S.to(state.dtype)
        if o > 0:
            state[int(checkpoint_slots[i])] = saved[o].to(state.dtype)
    return _finish(y, xc, D, z, cd) * _covered_mask(cu_seqlens, state_indices, T, cd)


def _covered_mask(cu_seqlens, state_indices, T, cd):
    """1 for tokens of non-PAD sequences, 0 elsewhere (as [T, 1, 1])."""
    m = torch.zeros(T, 1, 1, dtype=cd)
    cu = cu_seqlens.tolist()
    for i, slot in enumerate(state_indices.tolist()):
        if slot >= 0:
            m[cu[i] : cu[i + 1]] = 1
    return m


def mamba2_state_update_ref(
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
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of ``ops.mamba2_state_update``: one token per sequence (x [Nseq, H, P], B/C
    [Nseq, G, N]); the prefill reference with cu_seqlens = 0..Nseq."""
    n = x.shape[0]
    cu = torch.arange(n + 1, dtype=torch.int32)
    return mamba2_chunk_scan_ref(x, dt, A, B, C, D, dt_bias, state, state_indices, cu, z=z, dt_softplus=dt_softplus,
                                 dt_limit=dt_limit, compute_dtype=compute_dtype)


def mamba2_chunked_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    S: torch.Tensor,
    *,
    chunk: int = 64,
    offsets=(),
):
    """One sequence with the chunked SSD form (the kernel's algorithm), in the inputs' dtype:
    x [L, H, P], dt [L, H] (final step sizes), A [H], B/C [L, H, N] (per head), S [H, P, N] updated
    in place. A chunk also ends at every offset in ``offsets`` (a checkpoint). Returns (y without
    D/z, {o: copy of S after o tokens}). Per chunk of n tokens, with a = A dt and Acs its cumsum:

        Y      = (C B^T * exp(Acs_i - Acs_j) [j <= i]) (dt x)  +  exp(Acs_i) * (C S^T)
        S      = exp(Acs_end) S + (exp(Acs_end - Acs_j) dt_j x_j)^T B

    Every exponent is <= 0 (A <= 0, dt >= 0), so nothing overflows at any decay."""
    L = x.shape[0]
    y = torch.empty_like(x)
    saved = {}
    if 0 in offsets:
        saved[0] = S.clone()
    bounds = sorted({0, L, *range(0, L, chunk), *[o for o in offsets if 0 < o < L]})
    xs, Bs, Cs = x.transpose(0, 1), B.transpose(0, 1), C.transpose(0, 1)  # [H, L, .]
    dts = dt.transpose(0, 1)  # [H, L]
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        a = A[:, None] * dts[:, c0:c1]  # [H, n], <= 0
        Acs = a.cumsum(-1)
        diff = Acs[:, :, None] - Acs[:, None, :]  # [H, i, j]
        causal = torch.ones(c1 - c0, c1 - c0, dtype=torch.bool).tril()
        decay = torch.exp(diff.masked_fill(~causal, -math.inf))  # exponents <= 0 where kept
        CB = Cs[:, c0:c1] @ Bs[:, c0:c1].transpose(1, 2)  # [H, n, n]
        xdt = xs[:, c0:c1] * dts[:, c0:c1, None]  # [H, n, P]
        Y = (CB * decay) @ xdt + torch.exp(Acs)[:, :, None] * (Cs[:, c0:c1] @ S.transpose(1, 2))
        y[c0:c1] = Y.transpose(0, 1)
        to_end = torch.exp(Acs[:, -1:] - Acs)  # [H, n]
        S.mul_(torch.exp(Acs[:, -1])[:, None, None]).add_((xdt * to_end[:, :, None]).transpose(1, 2) @ Bs[:, c0:c1])
        if c1 in offsets:
            saved[c1] = S.clone()
    return y, saved
