"""The replaced layers' own projections and gated norm on our kernels.

At decode-sized token counts a projection is a matrix-vector product: its cost is streaming the
weights once, and vLLM's CPU GEMM (oneDNN, packed at load) leaves memory bandwidth unused there (at 16
tokens it streamed fp32 weights at about half the in-place stream rate). ``SmallBatchLinearMethod``
replaces the ``UnquantizedLinearMethod`` of a layer's projection modules:

* ``process_weights_after_loading`` keeps the weight as the plain ``[N, K]`` tensor it was loaded
  into (optionally with its rows permuted once, see ``row_order``) instead of letting vLLM repack it
  for oneDNN and free the original: one copy of the weights, as before;
* ``apply`` calls ``vllm_gdn_cpu::linear``: our streaming kernel up to a token count measured per
  weight dtype (``VLLM_GDN_CPU_LINEAR_MAX_M`` overrides it), torch's GEMM on the same tensor above it.

Quantized or otherwise non-plain projections keep vLLM's method; ``install_small_batch_linear``
returns the reason, which the layer's INFO line reports. The modules stay vLLM's (weight loaders,
tensor-parallel sharding, the row-parallel all-reduce), so any layer family can use this.
"""

from __future__ import annotations

import functools
import os

import torch

from vllm.model_executor.layers.linear import UnquantizedLinearMethod

from vllm_gdn_cpu import ops

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# "vllm" keeps vLLM's own projections and gated norm in the layers we replace (A/B comparisons,
# or a fallback); "auto" (default) runs ours where the weights allow.
PROJECTIONS_ENV = "VLLM_GDN_CPU_PROJECTIONS"


def _projections_mode() -> str:
    mode = os.environ.get(PROJECTIONS_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "vllm"):
        raise ValueError(f"vllm_gdn_cpu: {PROJECTIONS_ENV}={mode!r}: expected 'auto' or 'vllm'")
    return mode


class SmallBatchLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear method with our small-batch engine; ``row_order`` (int64 [N], a
    permutation of the output rows) reorders the weight (and bias) rows once after loading."""

    def __init__(self, row_order: torch.Tensor | None = None) -> None:
        super().__init__()
        self.row_order = row_order

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = layer.weight.data
        if self.row_order is not None:
            weight = weight.index_select(0, self.row_order)
            bias = getattr(layer, "bias", None)
            if bias is not None:
                bias.data = bias.data.index_select(0, self.row_order)
        layer.weight.data = weight.contiguous()

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 2:
            return ops.linear(x, layer.weight, bias)
        return ops.linear(x.reshape(-1, x.shape[-1]), layer.weight, bias).unflatten(0, x.shape[:-1])


def unsupported(module: torch.nn.Module) -> str | None:
    """Why our small-batch method cannot run this vLLM linear module (None: it can)."""
    if _projections_mode() == "vllm":
        return f"{PROJECTIONS_ENV}=vllm"
    method = getattr(module, "quant_method", None)
    if type(method) is not UnquantizedLinearMethod:
        return f"{type(method).__name__} weights"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in _DTYPES:
        return "weights not a plain fp32/bf16/fp16 matrix"
    return None


def install_small_batch_linear(module: torch.nn.Module, row_order: torch.Tensor | None = None) -> str | None:
    """Puts ``SmallBatchLinearMethod`` on a vLLM linear module before its weights load. Returns None
    when installed, else why vLLM's method stays."""
    if (reason := unsupported(module)) is not None:
        return reason
    weight = module.weight
    if row_order is not None and (row_order.dim() != 1 or row_order.numel() != weight.shape[0]):
        raise ValueError(
            f"vllm_gdn_cpu: row_order of {row_order.numel()} rows for a weight of {weight.shape[0]}"
        )
    module.quant_method = SmallBatchLinearMethod(row_order)
    return None


def install_all(modules: dict[str, torch.nn.Module | tuple[torch.nn.Module, torch.Tensor | None]]) -> str:
    """``install_small_batch_linear`` on each named module (or (module, row_order)); returns the
    INFO line's ``projections`` field: "ours" when all took it, else which kept vLLM's and why."""
    kept = {}
    for name, entry in modules.items():
        module, row_order = entry if isinstance(entry, tuple) else (entry, None)
        if (reason := install_small_batch_linear(module, row_order)) is not None:
            kept[name] = reason
    if not kept:
        return "ours"
    return "vllm (" + "; ".join(f"{name}: {reason}" for name, reason in kept.items()) + ")"


def _gated_norm_forward(norm: torch.nn.Module, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    if z is None:  # not the gated form: vLLM's own
        return norm.forward_native(x, z)
    activation = "sigmoid" if norm.activation == "sigmoid" else "silu"  # swish is silu
    return ops.gated_rms_norm(x, z, norm.weight, norm.eps, activation=activation)


def install_gated_norm(norm: torch.nn.Module) -> bool:
    """Runs a vLLM ``RMSNormGated`` (norm before gate, one group: the GDN layers' output norm) as our
    fused op: one pass instead of torch's eight elementwise kernels and their temporaries. Other
    configurations keep vLLM's; returns whether ours was installed."""
    if _projections_mode() == "vllm":
        return False
    if (getattr(norm, "group_size", None) is not None or not getattr(norm, "norm_before_gate", False)
            or getattr(norm, "activation", None) not in ("silu", "swish", "sigmoid")
            or getattr(norm, "bias", None) is not None or not hasattr(norm, "_forward_method")):
        return False
    # CustomOp.forward calls the per-instance _forward_method it chose at construction.
    norm._forward_method = functools.partial(_gated_norm_forward, norm)
    return True
