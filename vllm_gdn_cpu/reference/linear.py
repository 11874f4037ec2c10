"""Plain-torch reference of ops.small_linear / ops.linear."""

from __future__ import annotations

import torch


def linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """out[M, N] = x[M, K] @ weight[N, K]^T (+ bias[N]), computed in ``compute_dtype`` from the given
    (already rounded) inputs, rounded once to ``out_dtype`` (default: x's dtype)."""
    out = x.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(out_dtype or x.dtype)


def linear_int8_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Reference of ops.linear_int8: x @ (weight int8 [N, K] dequantized in float64 with its
    per-row weight_scale [N] or [N, 1])^T (+ bias), rounded once to ``out_dtype`` (default x's)."""
    dequantized = weight.to(torch.float64) * weight_scale.to(torch.float64).reshape(-1, 1)
    return linear_ref(x, dequantized, bias, out_dtype or x.dtype)
