"""vLLM's Qwen GDN layer with its CPU core (conv1d + gated delta rule) running on our kernels.

``GDNCPUQwenGatedDeltaNetAttention`` keeps vLLM's ``QwenGatedDeltaNetAttention`` (weights, loading,
state shapes, projection modules and their tensor-parallel sharding) and replaces the CPU forward:

* the projections (``in_proj_qkvz``, ``in_proj_ba``, ``out_proj``) run on our small-batch linear
  engine up to a measured token count (``vllm_gdn_cpu.layers.projections``); Qwen3-Next's
  interleaved rows are permuted once at load, so its q/k/v/z split costs nothing per step;
* the gated RMSNorm before ``out_proj`` is our fused op;
* the core runs as the custom op ``vllm::gdn_cpu_attention_core`` (opaque to torch.compile, like
  vLLM's own ``cpu_gdn_attention_core``), which reads the GDN attention metadata of the step and
  calls ``vllm_gdn_cpu.ops.gdn_decode_step`` for decode tokens (conv1d state update, q/k/v split,
  l2norm, gating and the recurrence in one call) and ``causal_conv1d`` + ``gdn_gating`` +
  ``chunk_gated_delta_rule`` for prefill (and chunked-prefill continuation) tokens.

State: ``layer.kv_cache = (conv_state, ssm_state)`` per slot. vLLM allocates the SSM state as
``[slots, Hv, V, K]``; only our kernels touch it and they view it as ``[slots, Hv, K, V]``.
"""

from __future__ import annotations

import torch

from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first
from vllm.utils.torch_utils import (
    LayerNameType,
    _encode_layer_name,
    _resolve_layer_name,
    direct_register_custom_op,
)
from vllm.v1.attention.backends.gdn_attn import GDNAttentionMetadata

from vllm_gdn_cpu import ops
from vllm_gdn_cpu.layers import gdn_spec_decode
from vllm_gdn_cpu.layers.common import CONV_ACTIVATIONS, CPUConvWeights, log_activation, op_slots
from vllm_gdn_cpu.layers.projections import install_all, install_gated_norm, permutable


def _output_rows(module) -> int:
    """This rank's output rows of a linear module: its weight's rows, or (quantized weights, whose
    tensors are packed: compressed-tensors ``weight_packed``) the partition size vLLM records."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0]
    return module.output_size_per_partition


class GDNCPUQwenGatedDeltaNetAttention(CPUConvWeights, QwenGatedDeltaNetAttention):
    """Drop-in for vLLM's ``QwenGatedDeltaNetAttention`` (Qwen3-Next interleaved and Qwen3.5 flat
    qkvz layouts), registered with ``PluggableLayer.register_oot`` by ``vllm_gdn_cpu.plugin``."""

    # beta = 2*sigmoid(b) when True (OLMo-hybrid's linear_allow_neg_eigval; vllm_gdn_cpu.layers.olmo
    # reuses forward_core and sets it per layer).
    allow_neg_eigval: bool = False
    # True when Qwen3-Next's interleaved projection rows were permuted at load (see __init__).
    flat_projections: bool = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.activation not in CONV_ACTIVATIONS:
            raise NotImplementedError(
                f"vllm_gdn_cpu: unsupported conv activation {self.activation!r}"
            )
        # Our small-batch projections. Qwen3-Next's interleaved q|k|v|z (per key-head group) and b|a
        # rows are permuted once at load into the flat order, so the projections' outputs need no
        # split-and-concatenate per step (not when in_proj_ba is replicated across ranks). Quantized
        # projections are permuted too where their tensors are row-major (compressed-tensors int8 /
        # WNA16: layers.projections.permutable); GPTQ / AWQ pack across rows and are not.
        self.flat_projections = (
            self.gqa_interleaved_layout and not (self.disable_tp_for_ba_proj and self.tp_size > 1)
            and permutable(self.in_proj_qkvz) and permutable(self.in_proj_ba))
        qkvz_order, ba_order = self._flat_row_orders() if self.flat_projections else (None, None)
        projections = install_all({"in_proj_qkvz": (self.in_proj_qkvz, qkvz_order),
                                   "in_proj_ba": (self.in_proj_ba, ba_order), "out_proj": self.out_proj})
        norm = "ours" if install_gated_norm(self.norm) else "vllm"
        fields = {"projections": projections, "norm": norm}
        if self.gqa_interleaved_layout:
            # GPTQ / AWQ weights (or VLLM_GDN_CPU_PROJECTIONS=vllm) keep the checkpoint's interleaved
            # rows and the outputs are split per step, as vLLM does.
            fields["qkvz_rows"] = ("flat (permuted at load)" if self.flat_projections
                                   else "interleaved (split per step)")
        log_activation("QwenGatedDeltaNetAttention", **fields)

    def _flat_row_orders(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The row permutations that turn this rank's interleaved in_proj_qkvz / in_proj_ba outputs
        into [q | k | v | z] and [b | a]: vLLM's own fix_query_key_value_ordering applied to the row
        numbers."""
        rows_qkvz = torch.arange(_output_rows(self.in_proj_qkvz)).unsqueeze(0)
        rows_ba = torch.arange(_output_rows(self.in_proj_ba)).unsqueeze(0)
        q, k, v, z, b, a = self.fix_query_key_value_ordering(rows_qkvz, rows_ba)
        return (torch.cat([t.flatten() for t in (q, k, v, z)]), torch.cat([b.flatten(), a.flatten()]))

    def forward_cpu(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The CPU forward (the in-tree __init__ dispatches ``forward`` to ``self.forward_cpu`` on
        CPU, which resolves to this override)."""
        mixed_qkv, z, b, a = self._project_inputs(hidden_states)
        # zeros, not empty: rows past num_actual_tokens (padding) are never written by the core
        # but still go through the norm and the output projection.
        core_attn_out = torch.zeros(
            (hidden_states.shape[0], self.num_v_heads // self.tp_size, self.head_v_dim),
            dtype=hidden_states.dtype,
        )
        torch.ops.vllm.gdn_cpu_attention_core(
            mixed_qkv, b, a, core_attn_out, _encode_layer_name(self.prefix)
        )
        return self._output_projection(core_attn_out, z)

    def _project_inputs(
        self, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """In-projections as vLLM's ``forward_cpu`` does them.

        Returns mixed_qkv [T, 2*key_dim + value_dim] (all q heads, then k, then v), z [T, Hv, V],
        and contiguous b, a [T, Hv].
        """
        mixed_qkvz, _ = self.in_proj_qkvz(hidden_states)
        ba, _ = self.in_proj_ba(hidden_states)
        if self.gqa_interleaved_layout and not self.flat_projections:
            # Qwen3-Next on vLLM's projections: q, k, v, z interleaved per key-head group
            query, key, value, z, b, a = self.fix_query_key_value_ordering(mixed_qkvz, ba)
            mixed_qkv = torch.cat((query.flatten(1), key.flatten(1), value.flatten(1)), dim=-1)
        else:  # Qwen3.5, or Qwen3-Next's rows permuted at load: [q | k | v | z] and [b | a]
            qkv_size = (self.key_dim * 2 + self.value_dim) // self.tp_size
            mixed_qkv, z = mixed_qkvz.split([qkv_size, self.value_dim // self.tp_size], dim=-1)
            z = z.unflatten(-1, (-1, self.head_v_dim))
            b, a = self.split_ba(ba)
        return mixed_qkv, z, b.contiguous(), a.contiguous()

    def _state_views(self, full_conv_buffer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv_state [slots, W-1, D], ssm_state [slots, Hv, K, V]) views of this layer's cache.

        With speculative decoding vLLM allocates W-1+S conv columns; non-spec rows use the first
        W-1 (vllm_gdn_cpu.layers.gdn_spec_decode asks for the whole buffer)."""
        conv_state, ssm_state = self.kv_cache
        if is_conv_state_dim_first():
            conv_state = conv_state.transpose(-1, -2)
        if not full_conv_buffer:
            conv_state = conv_state[:, : self._plain_conv_weight().shape[-1] - 1]
        num_slots, num_heads, v_dim, k_dim = ssm_state.shape
        return conv_state, ssm_state.view(num_slots, num_heads, k_dim, v_dim)

    def forward_core(
        self,
        mixed_qkv: torch.Tensor,
        b: torch.Tensor,
        a: torch.Tensor,
        core_attn_out: torch.Tensor,
        metadata: GDNAttentionMetadata,
    ) -> None:
        """Conv1d + gated delta rule for one step; writes core_attn_out[:num_tokens] and the state.

        vLLM orders a non-speculative batch decodes first, then prefills (which include chunked
        prefill continuations, whose ``has_initial_state`` is True).
        """
        if metadata.num_spec_decodes > 0 or metadata.spec_sequence_masks is not None:
            return gdn_spec_decode.forward_core_spec(self, mixed_qkv, b, a, core_attn_out, metadata)
        num_decodes = metadata.num_decodes
        num_seqs = num_decodes + metadata.num_prefills
        num_decode_tokens = metadata.num_decode_tokens
        num_tokens = num_decode_tokens + metadata.num_prefill_tokens
        if num_seqs == 0:
            return
        cu_seqlens = metadata.non_spec_query_start_loc[: num_seqs + 1]
        state_indices = op_slots(metadata.non_spec_state_indices_tensor[:num_seqs])  # a block-table column under spec decode
        has_initial_state = (
            None if metadata.has_initial_state is None else metadata.has_initial_state[:num_seqs]
        )
        conv_state, ssm_state = self._state_views()

        weight, bias = self._conv_weight_for_ops(), self.conv1d.bias
        silu = CONV_ACTIVATIONS[self.activation]
        decode, prefill = slice(0, num_decode_tokens), slice(num_decode_tokens, num_tokens)
        if num_decodes > 0 and silu:
            # The whole decode core (conv update, q/k/v split, l2norm, gating, recurrence) in one op.
            ops.gdn_decode_step(
                mixed_qkv[decode], weight, bias, conv_state, self.A_log, self.dt_bias, a[decode], b[decode],
                ssm_state, state_indices[:num_decodes], num_k_heads=self.num_k_heads // self.tp_size,
                head_k_dim=self.head_k_dim, head_v_dim=self.head_v_dim, out=core_attn_out[decode],
                allow_neg_eigval=self.allow_neg_eigval,
            )
        elif num_decodes > 0:
            q, k, v = self._conv_qkv(mixed_qkv[decode], weight, bias, conv_state, state_indices[:num_decodes],
                                     cu_seqlens[: num_decodes + 1], None, silu)
            ops.fused_recurrent_gated_delta_rule(
                q, k, v, self.A_log, self.dt_bias, a[decode], b[decode], ssm_state, state_indices[:num_decodes],
                out=core_attn_out[decode], allow_neg_eigval=self.allow_neg_eigval,
            )
        if metadata.num_prefills > 0:
            prefill_cu = cu_seqlens[num_decodes:] - num_decode_tokens
            prefill_slots = state_indices[num_decodes:]
            prefill_has_init = None if has_initial_state is None else has_initial_state[num_decodes:]
            q, k, v = self._conv_qkv(mixed_qkv[prefill], weight, bias, conv_state, prefill_slots, prefill_cu,
                                     prefill_has_init, silu)
            g, beta = ops.gdn_gating(self.A_log, a[prefill], b[prefill], self.dt_bias,
                                     allow_neg_eigval=self.allow_neg_eigval)
            ops.chunk_gated_delta_rule(
                q, k, v, g, beta, ssm_state, prefill_slots, prefill_cu,
                has_initial_state=prefill_has_init, out=core_attn_out[prefill],
            )

    def _conv_qkv(self, x, weight, bias, conv_state, state_indices, cu_seqlens, has_initial_state, silu):
        """Causal conv1d (+ SiLU) of mixed q|k|v channels, split into [T, H, dim] head views."""
        conv_out = ops.causal_conv1d(x, weight, bias, conv_state, state_indices, cu_seqlens,
                                     has_initial_state=has_initial_state, silu=silu)
        key_dim, value_dim = self.key_dim // self.tp_size, self.value_dim // self.tp_size
        q, k, v = conv_out.split([key_dim, key_dim, value_dim], dim=-1)
        q, k = q.unflatten(-1, (-1, self.head_k_dim)), k.unflatten(-1, (-1, self.head_k_dim))
        return q, k, v.unflatten(-1, (-1, self.head_v_dim))


def gdn_cpu_attention_core(
    mixed_qkv: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    core_attn_out: torch.Tensor,
    layer_name: LayerNameType,
) -> None:
    forward_context = get_forward_context()
    layer = forward_context.no_compile_layers[_resolve_layer_name(layer_name)]
    attn_metadata = forward_context.attn_metadata
    if attn_metadata is None:  # profiling / dummy run: no state is bound, output stays zero
        return
    layer.forward_core(mixed_qkv, b, a, core_attn_out, attn_metadata[layer.prefix])


def _gdn_cpu_attention_core_fake(
    mixed_qkv: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    core_attn_out: torch.Tensor,
    layer_name: LayerNameType,
) -> None:
    return None


direct_register_custom_op(
    op_name="gdn_cpu_attention_core",
    op_func=gdn_cpu_attention_core,
    mutates_args=["core_attn_out"],
    fake_impl=_gdn_cpu_attention_core_fake,
)
