"""Plain-torch references of the Mamba-1 selective-scan ops (token by token: the definition).

Math per sequence, channel d, token t (state h_t of shape [N] per channel, [Dm, N] per sequence)::

    dt_t = softplus(dt_t + dt_bias)                      (threshold 20, linear above; only with dt_softplus)
    h_t  = exp(dt_t * A[d]) (.) h_{t-1} + dt_t * x_t * B_t
    y_t  = <h_t, C_t> + D * x_t                          (then * silu(z_t) when z is given)

Token-major like the rest of the project: x, dt, z, y [T, Dm]; B, C [T, N]; A [Dm, N]; state pool
[slots, Dm, N]. ``selective_state_update_ref`` is the same with one token per sequence.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def mamba1_dt(
    dt: torch.Tensor,
    dt_bias: Optional[torch.Tensor],
    dt_softplus: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The step sizes [T, Dm]: softplus(dt + dt_bias) (threshold 20, linear above) or dt + dt_bias."""
    d = dt.to(compute_dtype)
    if dt_bias is not None:
        d = d + dt_bias.to(compute_dtype)
    if dt_softplus:
        d = F.softplus(d, beta=1.0, threshold=20.0)
    return d


def _recurrence(x, dt, A, B, C, S, offsets=()):
    """One sequence in the compute dtype: x, dt [L, Dm], A [Dm, N], B/C [L, N], S [Dm, N] updated in
    place. Returns (y [L, Dm] without D/z, {o: copy of S after the first o tokens for o in offsets})."""
    y = torch.empty_like(x)
    saved = {}
    for t in range(x.shape[0]):
        if t in offsets:
            saved[t] = S.clone()
        S.mul_(torch.exp(dt[t][:, None] * A)).add_((dt[t] * x[t])[:, None] * B[t][None, :])
        y[t] = S @ C[t]
    if x.shape[0] in offsets:
        saved[x.shape[0]] = S.clone()
    return y, saved


def selective_scan_ref(
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
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of ``ops.selective_scan`` (same arguments). Updates ``state`` in place (in its
    dtype) and returns y [T, Dm] in ``compute_dtype``. PAD entries (state_indices < 0) get zero
    output and touch no slot (nor their checkpoint slot); tokens past cu_seqlens[-1] get zero output.
    checkpoint_offsets[i] = o > 0 also stores the state after the first o tokens of sequence i into
    slot checkpoint_slots[i]."""
    cd = compute_dtype
    T, Dm = x.shape
    xc, Ac, Bc, Cc = x.to(cd), A.to(cd), B.to(cd), C.to(cd)
    dtc = mamba1_dt(dt, dt_bias, dt_softplus, cd)
    y = torch.zeros(T, Dm, dtype=cd)
    covered = torch.zeros(T, 1, dtype=cd)
    cu = cu_seqlens.tolist()
    for i, slot in enumerate(state_indices.tolist()):
        if slot < 0:
            continue
        s, e = cu[i], cu[i + 1]
        covered[s:e] = 1
        init = has_initial_state is None or bool(has_initial_state[i])
        S = state[slot].to(cd) if init else torch.zeros(state.shape[1:], dtype=cd)
        o = 0 if checkpoint_offsets is None else int(checkpoint_offsets[i])
        yi, saved = _recurrence(xc[s:e], dtc[s:e], Ac, Bc[s:e], Cc[s:e], S, (o,) if o > 0 else ())
        y[s:e] = yi
        state[slot] = S.to(state.dtype)
        if o > 0:
            state[int(checkpoint_slots[i])] = saved[o].to(state.dtype)
    if D is not None:
        y = y + D.to(cd)[None, :] * xc
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y * covered


def selective_state_update_ref(
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
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of ``ops.selective_state_update``: one token per sequence (x, dt, z [Nseq, Dm],
    B, C [Nseq, N]); the prefill reference with cu_seqlens = 0..Nseq."""
    cu = torch.arange(x.shape[0] + 1, dtype=torch.int32)
    return selective_scan_ref(x, dt, A, B, C, D, z, dt_bias, state, state_indices, cu, dt_softplus=dt_softplus,
                              compute_dtype=compute_dtype)
