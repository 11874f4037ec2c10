"""Plain-torch reference of ops.gated_rms_norm."""

from __future__ import annotations

import torch


def gated_rms_norm_ref(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    activation: str = "silu",
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """vLLM's RMSNormGated (norm_before_gate=True, group_size=None):
    rmsnorm(x) * weight * act(z) over the last dim, act = silu ("swish") or sigmoid, computed in
    ``compute_dtype``, rounded once to x's dtype."""
    xf, zf, wf = x.to(compute_dtype), z.to(compute_dtype), weight.to(compute_dtype)
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    gate = torch.sigmoid(zf) if activation == "sigmoid" else torch.nn.functional.silu(zf)
    return (normed * wf * gate).to(x.dtype)
