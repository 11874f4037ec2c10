"""Fused normalisations of the layers' outputs."""

from __future__ import annotations

from typing import Optional

import torch

from vllm_gdn_cpu.ops.common import _ops, register_fake, tensor_arguments

_ACTIVATIONS = {"silu": False, "swish": False, "sigmoid": True}  # name -> sigmoid?


@tensor_arguments
def gated_rms_norm(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    activation: str = "silu",
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """vLLM's RMSNormGated (norm_before_gate=True, one group) in one pass over the last dim:
    out = x * rsqrt(mean(x^2) + eps) * weight * act(z), act = silu ("swish" alike) or sigmoid, in
    fp32, rounded once to x's dtype.

    x, z, out: [..., D] of one float dtype with any leading shape and contiguous last dims (rows may
    be strided: z may be a slice of a projection's output); out may be x or z itself. weight: [D]
    of any float dtype. Returns out (by default a new tensor like x)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"gated_rms_norm: argument 'activation' must be one of {sorted(_ACTIVATIONS)}, "
                         f"got {activation!r}")
    o = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    _ops.gated_rms_norm(x, z, weight, float(eps), _ACTIVATIONS[activation], o)
    return o


@register_fake("gated_rms_norm")
def _gated_rms_norm_fake(x, z, weight, eps, sigmoid, out):
    return None
