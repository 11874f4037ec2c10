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
non-plain projections keep vLLM's method (and its kernel, e.g. oneDNN's int8 GEMM or CPUWNA16);
``install_small_batch_linear`` returns the reason, which the layer's INFO line reports as the
scheme and vLLM kernel serving each such projection. The modules stay vLLM's (weight loaders, tensor-parallel sharding, the
row-parallel all-reduce), so any layer family can use this.
"""

from __future__ import annotations

import functools
import os

import torch

from vllm.model_executor.layers.linear import LinearMethodBase, UnquantizedLinearMethod

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


def quantized_gemm(module: torch.nn.Module) -> str:
    """What serves a quantized vLLM linear module: its scheme (compressed-tensors) or method, and
    the vLLM kernel it picked at construction, e.g. ``CompressedTensorsW8A8Int8 on
    CPUInt8ScaledMMLinearKernel`` (docs/quantization.md lists them per format)."""
    method = getattr(module, "quant_method", None)
    scheme = getattr(module, "scheme", None)
    owner = scheme if scheme is not None else method
    kernel = getattr(owner, "kernel", None)
    name = type(owner).__name__
    return f"{name} on {type(kernel).__name__}" if kernel is not None else name


def unsupported(module: torch.nn.Module) -> str | None:
    """Why our small-batch method cannot run this vLLM linear module (None: it can). For quantized
    weights: which scheme and vLLM kernel serve it instead (``quantized_gemm``)."""
    if _projections_mode() == "vllm":
        return f"{PROJECTIONS_ENV}=vllm"
    method = getattr(module, "quant_method", None)
    if type(method) is not UnquantizedLinearMethod:
        return quantized_gemm(module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in _DTYPES:
        return "weights not a plain fp32/bf16/fp16 matrix"
    return None


# Quantized weights whose every tensor is output-row major (row n of each is output n's): their rows
# can be permuted before vLLM's (or our) processing. compressed-tensors' W8A8 int8 (weight [N, K],
# weight_scale [N, 1] or one per shard) and symmetric WNA16 (weight_packed [N, K/8], weight_scale
# [N, groups]); GPTQ / AWQ pack along N or keep [K, N] and are not permuted.
_ROW_MAJOR_SCHEMES = {"CompressedTensorsW8A8Int8": ("weight", "weight_scale"),
                      "CompressedTensorsWNA16": ("weight_packed", "weight_scale")}


def _scheme(module: torch.nn.Module):
    return getattr(module, "scheme", None)


def _row_params(module: torch.nn.Module) -> tuple[str, ...] | None:
    """The row-major parameters of a quantized module whose rows may be permuted, else None."""
    scheme = _scheme(module)
    names = _ROW_MAJOR_SCHEMES.get(type(scheme).__name__)
    if names is None or getattr(module, "weight_zero_point", None) is not None:
        return None
    if type(scheme).__name__ == "CompressedTensorsW8A8Int8" and not _is_channelwise(scheme):
        return None
    return names


def _is_channelwise(scheme) -> bool:
    strategy = getattr(scheme, "strategy", None)
    return str(getattr(strategy, "value", strategy)) == "channel"


def int8_channel_weights(module: torch.nn.Module) -> bool:
    """compressed-tensors W8A8 int8 with one weight scale per output row: what our int8 engine
    (``ops.linear_int8``, weight-only) can serve."""
    weight = getattr(module, "weight", None)
    return (type(_scheme(module)).__name__ == "CompressedTensorsW8A8Int8" and _is_channelwise(_scheme(module))
            and isinstance(weight, torch.Tensor) and weight.dtype == torch.int8 and weight.dim() == 2)


def permutable(module: torch.nn.Module) -> bool:
    """Whether ``install_small_batch_linear`` can permute this module's output rows at load."""
    if _projections_mode() == "vllm":
        return False
    return unsupported(module) is None or _row_params(module) is not None


def int8_engine() -> str:
    """The engine for compressed-tensors W8A8 int8 (per-channel) projections: "ours" (weight-only
    int8 on ``ops.linear_int8``: activations stay unquantized) with VLLM_GDN_CPU_PROJECTIONS=ours,
    else "vllm" (its W8A8 kernel: per-token int8 activations, VNNI int8 dot products; rows still
    permuted at load where asked). From measurements (docs/quantization.md, 1 thread by CPU time,
    Zen 4, two runs): ours 0.94-1.18x vLLM's oneDNN int8 GEMM at M = 1, but 0.62-0.72x at M = 4
    and 0.3x at M = 16 (our int8 -> fp32 conversion and fp32 FMAs against its int8 dot products)."""
    return "ours" if _projections_mode() == "ours" else "vllm"


def _permute_rows(module: torch.nn.Module, names, row_order: torch.Tensor | None) -> None:
    if row_order is None:
        return
    for name in (*names, "bias"):
        param = getattr(module, name, None)
        if isinstance(param, torch.Tensor) and param.dim() >= 1 and param.shape[0] == row_order.numel():
            param.data = param.data.index_select(0, row_order).contiguous()


class QuantizedRowsMethod(LinearMethodBase):
    """vLLM's quantized linear method (``inner``) with the output rows of its row-major tensors
    permuted once after loading, before its own processing (packing for its kernel)."""

    engine = "vllm"

    def __init__(self, inner, row_order: torch.Tensor) -> None:
        self.inner = inner
        self.row_order = row_order

    def create_weights(self, *args, **kwargs):  # the module's weights exist already
        return self.inner.create_weights(*args, **kwargs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        _permute_rows(layer, _row_params(layer), self.row_order)
        self.inner.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.apply(layer, x, bias)


class SmallBatchInt8LinearMethod(LinearMethodBase):
    """compressed-tensors W8A8 int8 (per-channel) weights on our engine, weight-only: the int8
    [N, K] weight stays as loaded (rows permuted once if asked), its scales become fp32 [N], and
    ``apply`` runs ``ops.linear_int8`` (ours up to a token count, torch's GEMM on the dequantized
    weight above; x is not quantized). vLLM's oneDNN handler (a repacked copy) is not built."""

    engine = "ours-int8"

    def __init__(self, inner, row_order: torch.Tensor | None = None) -> None:
        self.inner = inner
        self.row_order = row_order

    def create_weights(self, *args, **kwargs):
        return self.inner.create_weights(*args, **kwargs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        _permute_rows(layer, ("weight", "weight_scale"), self.row_order)
        layer.weight.data = layer.weight.data.contiguous()
        layer.weight_scale.data = layer.weight_scale.data.to(torch.float32).reshape(-1).contiguous()

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 2:
            return ops.linear_int8(x, layer.weight, layer.weight_scale, bias)
        flat = ops.linear_int8(x.reshape(-1, x.shape[-1]), layer.weight, layer.weight_scale, bias)
        return flat.unflatten(0, x.shape[:-1])


def install_small_batch_linear(module: torch.nn.Module, row_order: torch.Tensor | None = None) -> str | None:
    """Puts ``SmallBatchLinearMethod`` on a vLLM linear module before its weights load (for
    compressed-tensors W8A8 int8 per-channel weights: ``SmallBatchInt8LinearMethod`` where
    ``int8_engine`` says ours; other permutable quantized weights: vLLM's method with the rows
    permuted first). Returns None when our plain-weight method was installed, else a description
    of what serves the module (which the INFO line reports)."""
    reason = unsupported(module)
    weight = getattr(module, "weight", None)
    rows = (weight.shape[0] if reason is None else
            getattr(module, "output_size_per_partition", None))
    if row_order is not None and (row_order.dim() != 1 or (rows is not None and row_order.numel() != rows)):
        raise ValueError(f"vllm_gdn_cpu: row_order of {row_order.numel()} rows for a weight of {rows}")
    if reason is None:
        module.quant_method = SmallBatchLinearMethod(row_order, engine_for(weight.dtype))
        return None
    if _projections_mode() == "vllm":
        return reason
    if int8_channel_weights(module) and int8_engine() == "ours":
        module.quant_method = SmallBatchInt8LinearMethod(module.quant_method, row_order)
        return f"ours-int8 ({type(_scheme(module)).__name__} weights, weight-only: activations unquantized)"
    if row_order is not None:
        if _row_params(module) is None:
            raise ValueError(f"vllm_gdn_cpu: cannot permute the rows of {reason} weights")
        module.quant_method = QuantizedRowsMethod(module.quant_method, row_order)
        return reason + ", rows permuted at load"
    return reason


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
        # quantized (or vLLM-mode) projections: what serves each of them
        uses_ours = len(kept) < len(modules) or any(r.startswith("ours") for r in kept.values())
        uses_vllm = any(not r.startswith("ours") for r in kept.values())
        head = "ours + vllm" if uses_ours and uses_vllm else ("ours" if uses_ours else "vllm")
        return f"{head} (" + "; ".join(f"{name}: {reason}" for name, reason in kept.items()) + ")"
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
