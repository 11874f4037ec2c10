"""Small-batch linear engine: matrix-vector style products that stream a plain [N, K] weight at the
memory roofline for decode-sized token counts, and the dispatcher the layers call."""

from __future__ import annotations

from typing import Optional

import torch

from vllm_gdn_cpu.ops.common import _ops, register_fake, tensor_arguments

# Token count up to which ops.linear runs our kernel (0: never); unset: a default measured per
# weight dtype (kernels/common/linear_ops.cpp).
LINEAR_MAX_M_ENV = "VLLM_GDN_CPU_LINEAR_MAX_M"


@tensor_arguments
def small_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """out[M, N] = x[M, K] @ weight[N, K]^T (+ bias[N]) on our kernel, for any M.

    weight: 2-D contiguous fp32/bf16/fp16 (plain row-major, not repacked); x: [M, K] of any float
    dtype with a contiguous last dim (rows may be strided); bias: [N] of any float dtype or None;
    out: [M, N] fp32/bf16/fp16 with a contiguous last dim (rows may be strided, e.g. a slice of a
    wider buffer), by default a new tensor in x's dtype. fp32 accumulation, one rounding to out's
    dtype. bf16 x with bf16 weights (M >= 2, K even) run on AMX tiles where the prefill's GEMM engine
    is AMX (VLLM_GDN_CPU_GEMM auto/amx with the avx512_bf16 kernels), otherwise on the vector kernel
    of the active ISA (VLLM_GDN_CPU_ISA). Returns out."""
    o = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device) if out is None else out
    _ops.small_linear(x, weight, bias, o)
    return o


@tensor_arguments
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear for x [M, K] and a plain weight [N, K]: our kernel (small_linear) when M is at most
    VLLM_GDN_CPU_LINEAR_MAX_M (default measured per weight dtype: fp32 32, bf16 16 where our AMX
    path runs and 48 elsewhere, fp16 16; kernels/common/linear_ops.cpp), else torch's GEMM on the same
    weight (``torch.nn.functional.linear``; x converted to the weight's dtype when they differ).
    Returns [M, N] in x's dtype."""
    return _ops.linear(x, weight, bias)


@tensor_arguments
def linear_int8(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] int8 * weight_scale [N] or [N, 1] float32)^T (+ bias[N]):
    weight-only int8 (per output row scale; x stays in its float dtype). Our kernel (the int8 weight
    converted in registers, fp32 accumulation, the scale applied to each row's sums) up to
    VLLM_GDN_CPU_LINEAR_MAX_M tokens (default 32), else torch's GEMM on the weight dequantized to
    x's dtype for the call. Returns [M, N] in x's dtype."""
    return _ops.linear_int8(x, weight, weight_scale, bias)


def linear_path_counts() -> dict:
    """Process-wide calls of ``linear`` per path since start (or the last reset): {"small": our
    kernel, "large": torch's GEMM}."""
    small, large = _ops.linear_path_counts()
    return {"small": int(small), "large": int(large)}


def reset_linear_path_counts() -> None:
    """Zeroes the counters of linear_path_counts."""
    _ops.reset_linear_path_counts()


@register_fake("small_linear")
def _small_linear_fake(x, weight, bias, out):
    return None


@register_fake("linear")
def _linear_fake(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@register_fake("linear_int8")
def _linear_int8_fake(x, weight, weight_scale, bias):
    return x.new_empty(x.shape[0], weight.shape[0])
