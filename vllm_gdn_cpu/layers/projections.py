"""The replaced layers' own projections and gated norm on our kernels.

At decode-sized token counts a projection is a matrix-vector product: its cost is streaming the
weights once. ``SmallBatchLinearMethod`` replaces the ``UnquantizedLinearMethod`` of a layer's
projection modules. After loading it permutes the weight rows once if asked (``row_order``: e.g.
Qwen3-Next's interleaved q|k|v|z into flat order, so no per-step split is needed), then runs one of
two GEMM engines, chosen per weight dtype from measurements (docs/performance.md, "Small-batch
projections"):

* ``ours``: the weight stays the plain ``[N, K]`` tensor it was loaded into (vLLM's oneDNN-repacked
  copy is not made: one copy of the weights, as before) and ``apply`` calls ``vllm_gdn_cpu::linear``:
  our streaming kernel up to a token count measured per weight dtype (``VLLM_GDN_CPU_LINEAR_MAX_M``),
  torch's GEMM on the same tensor above it;
* ``vllm``: vLLM's own CPU GEMM (its load-time repacking, e.g. oneDNN), on the permuted rows. Chosen
  for bf16 weights on CPUs with AMX, where oneDNN's AMX kernels already stream decode-sized products
  at the memory roofline, ran up to 15% ahead of ours at 16 tokens and well ahead of torch's GEMM
  (our large-M path) between 16 and a few hundred tokens.

``VLLM_GDN_CPU_PROJECTIONS``: ``auto`` (that choice), ``ours`` (our engine for every dtype), ``vllm``
(vLLM's projections and norm untouched: no permutation, no method swap). Quantized or otherwise
non-plain projections keep vLLM's method; ``install_small_batch_linear`` returns the reason, which
the layer's INFO line reports. The modules stay vLLM's (weight loaders, tensor-parallel sharding, the
row-parallel all-reduce), so any layer family can use this.
"""

from __future__ import annotations

import functools
import os

import torch

from vllm.model_executor.layers.linear import UnquantizedLinearMethod

from vllm_gdn_cpu import ops

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PROJECTIONS_ENV = "VLLM_GDN_CPU_PROJECTIONS"
_MODES = ("auto", "ours", "vllm")


def _projections_mode() -> str:
    mode = os.environ.get(PROJECTIONS_ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"vllm_gdn_cpu: {PROJECTIONS_ENV}={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def engine_for(dtype: torch.dtype) -> str:
    """The GEMM engine ("ours" or "vllm") our projections use for weights of `dtype` on this CPU."""
    if _projections_mode() == "ours":
        return "ours"
    if dtype == torch.bfloat16 and "amx" in ops.runtime_info()["available_gemms"]:
        return "vllm"  # oneDNN's AMX GEMM (see the module docstring)
    return "ours"


class SmallBatchLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear method with rows permuted once after loading (``row_order``, int64
    [N], a permutation of the output rows, or None) and the GEMM of ``engine``: "ours" (plain weight,
    ``ops.linear``) or "vllm" (vLLM's own repacking and GEMM)."""

    def __init__(self, row_order: torch.Tensor | None = None, engine: str = "ours") -> None:
        super().__init__()
        if engine not in ("ours", "vllm"):
            raise ValueError(f"vllm_gdn_cpu: unknown projection engine {engine!r}")
        self.row_order = row_order
        self.engine = engine

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = layer.weight.data
        if self.row_order is not None:
            weight = weight.index_select(0, self.row_order)
            bias = getattr(layer, "bias", None)
            if bias is not None:
                bias.data = bias.data.index_select(0, self.row_order)
        layer.weight.data = weight.contiguous()
        if self.engine == "vllm":
            super().process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.engine == "vllm":
            if not x.is_contiguous():
                # vLLM 0.32's small-weight bf16 GEMM (sgl-kernel weight_packed_linear) reads rows
                # 1.. at the wrong place when the row stride is odd and M is 2-4 (a column slice
                # of a merged projection); a copy of M x K inputs is cheap beside the GEMM.
                x = x.contiguous()
            return super().apply(layer, x, bias)
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
    module.quant_method = SmallBatchLinearMethod(row_order, engine_for(weight.dtype))
    return None


def install_all(modules: dict[str, torch.nn.Module | tuple[torch.nn.Module, torch.Tensor | None]]) -> str:
    """``install_small_batch_linear`` on each named module (or (module, row_order)); returns the
    INFO line's ``projections`` field: the engine(s) when all took it, else which kept vLLM's method
    and why."""
    kept, engines = {}, set()
    for name, entry in modules.items():
        module, row_order = entry if isinstance(entry, tuple) else (entry, None)
        if (reason := install_small_batch_linear(module, row_order)) is not None:
            kept[name] = reason
        else:
            engines.add(module.quant_method.engine)
    if kept:
        return "vllm (" + "; ".join(f"{name}: {reason}" for name, reason in kept.items()) + ")"
    if engines == {"ours"}:
        return "ours"
    if engines == {"vllm"}:
        return "vllm-gemm (bf16 weights on AMX: oneDNN's tiles)"
    return "ours + vllm-gemm"


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
