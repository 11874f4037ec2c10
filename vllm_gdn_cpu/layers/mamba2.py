"""vLLM's ``MambaMixer2`` (Mamba2 / SSD layers) with its conv + SSM core on our CPU kernels.

``GDNCPUMambaMixer2`` keeps everything of vLLM's ``MambaMixer2`` (weights and their TP sharding and
loading, the gated RMSNorm, state shapes and dtypes, the MAMBA2 attention backend and its metadata)
and replaces the conv1d + SSM core; ``in_proj`` and ``out_proj`` run on our small-batch linear
engine (``vllm_gdn_cpu.layers.projections``). The core runs as the
custom op ``vllm::mamba2_cpu_core`` (opaque to torch.compile, like vLLM's ``mamba_mixer2``), which
reads the step's ``Mamba2AttentionMetadata`` and calls, with no Python loop over tokens:

* decode tokens (batch order: decodes first): ``ops.causal_conv1d`` over length-1 sequences (conv
  state update) and ``ops.mamba2_state_update``;
* prefill tokens (new prompts, chunked-prefill continuations and prefix-cache hits, which continue
  from the slot's state when ``has_initial_states_p``): ``ops.causal_conv1d`` + ``ops.mamba2_chunk_scan``.

Prefix caching ("align" mamba cache mode, vLLM's default for hybrids): MambaMixer2 declares one
*prefill checkpoint* per prefill row (``get_kv_cache_spec``: ``num_prefill_checkpoint_blocks=1``),
so the scheduler does not split a prompt at block boundaries; instead the layer must export the
state after the first ``checkpoint_offsets[i]`` tokens of row i into the cache block
``checkpoint_meta.state_indices[i]``. What vLLM's GPU path stores there
(ops/ssd_checkpoint.py ``store_prefill_checkpoint``): the SSM state at that token (an SSD chunk
state) and, as conv state, the W-1 pre-conv inputs (x|B|C) before the offset, oldest first. We
store the same: the SSM state through the scan op's ``checkpoint_offsets/slots``, the conv
history by vectorised indexing (reaching back into the row's initial conv state when the offset
is shorter than W-1, where the Triton kernel would read another row's tokens). vLLM's own CPU path
crashes here (its CPU scan returns no chunk states: IndexError at ``varlen_states[last_chunk_indices_p]``).

State: ``layer.kv_cache = (conv_state, ssm_state)``; conv ``[slots, W-1, conv_dim]`` on CPU ("SD"
layout; a transposed view in the dim-first layout), SSM ``[slots, H, P, N]``, both as our ops take
them. Speculative decoding: ``_spec_decode_core`` (a loop over the at most S+1 draft positions,
not over tokens). With prefix caching on as well ("align" mode), vLLM's model runner moves the
running conv and SSM states between block columns at the accepted-token offset before each step
and into the block at a block boundary after it; its Triton kernels for that have CPU stand-ins
installed by the plugin (``align_copies.ALIGN_KERNEL_OVERRIDES``), which handle this layer's
states (conv ``[W-1+S, conv_dim]`` rows, SSM ``[H, P, N]``) like GDN's. Refused at layer build with
a clear error: vLLM's ReplaySSM decode.
"""

from __future__ import annotations

import torch

from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first
from vllm.utils.torch_utils import (
    LayerNameType,
    _encode_layer_name,
    direct_register_custom_op,
)
from vllm.v1.attention.backends.mamba2_attn import Mamba2AttentionMetadata

from vllm_gdn_cpu import ops
from vllm_gdn_cpu.layers.projections import install_all
from vllm_gdn_cpu.layers.common import (CONV_ACTIVATIONS, CPUConvWeights, log_activation, op_slots, spec_decode_conv,
                                        spec_decode_states, step_layer_and_metadata)


class GDNCPUMambaMixer2(CPUConvWeights, MambaMixer2):
    """Drop-in for vLLM's ``MambaMixer2`` (Mamba2, Granite-4.0-H, NemotronH, Falcon-H1, Zamba2, ...),
    registered with ``PluggableLayer.register_oot`` by ``vllm_gdn_cpu.plugin``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.activation not in CONV_ACTIVATIONS:
            raise NotImplementedError(
                f"vllm_gdn_cpu: unsupported MambaMixer2 conv activation {self.activation!r} in {self.prefix}"
            )
        if self.use_replayssm:
            raise NotImplementedError(
                "vllm_gdn_cpu: --use-replayssm is not supported for Mamba2 layers by the GDN_CPU "
                "backend (vLLM's ReplaySSM decode kernels are Triton/FlashInfer)"
            )
        projections = install_all({"in_proj": self.in_proj, "out_proj": self.out_proj})
        log_activation("MambaMixer2", projections=projections)

    def forward(self, hidden_states: torch.Tensor, mup_vector: torch.Tensor | None = None):
        """vLLM's ``MambaMixer2.forward`` with the core op swapped for ours."""
        projected_states, _ = self.in_proj(hidden_states)
        if mup_vector is not None:
            projected_states = projected_states * mup_vector
        # zeros, not empty: rows past the step's real tokens (padding) are never written by the
        # core but still go through the norm and out_proj.
        ssm_output = torch.zeros(
            (hidden_states.shape[0], (self.num_heads // self.tp_size) * self.head_dim),
            dtype=hidden_states.dtype,
            device=hidden_states.device,
        )
        torch.ops.vllm.mamba2_cpu_core(projected_states, ssm_output, _encode_layer_name(self.prefix))
        gate = projected_states[..., : self.tped_intermediate_size]
        output, _ = self.out_proj(self.norm(ssm_output, gate))
        return output

    # -- weights and state views -------------------------------------------------------------

    def _state_views(self, full_conv_buffer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv_state [slots, W-1, conv_dim], ssm_state [slots, H, P, N]) views of the cache.
        With speculative decoding vLLM allocates W-1+S conv columns; prefill rows use the first W-1
        (speculative decode rows ask for the whole buffer)."""
        conv_state, ssm_state = self.kv_cache[0], self.kv_cache[1]
        if is_conv_state_dim_first():
            conv_state = conv_state.transpose(-1, -2)
        if not full_conv_buffer:
            conv_state = conv_state[:, : self.conv_kernel_size - 1]
        return conv_state, ssm_state

    def _split_heads(self, conv_out: torch.Tensor):
        """conv output [T, conv_dim] -> x [T, H, P], B [T, G, N], C [T, G, N] (views)."""
        x, B, C = self.split_hidden_states_B_C_fn(conv_out)
        groups = self.n_groups // self.tp_size
        return (
            x.unflatten(-1, (self.num_heads // self.tp_size, self.head_dim)),
            B.unflatten(-1, (groups, self.ssm_state_size)),
            C.unflatten(-1, (groups, self.ssm_state_size)),
        )

    # -- the core ------------------------------------------------------------------------------

    def forward_core(
        self, projected_states: torch.Tensor, output: torch.Tensor, metadata: Mamba2AttentionMetadata
    ) -> None:
        """Conv1d + SSM for one step: writes output[:num_actual_tokens] and the states."""
        xbc, dt = torch.split(
            projected_states[..., self.tped_intermediate_size :],
            [self.tped_conv_size, self.tped_dt_size],
            dim=-1,
        )
        num_decodes, num_decode_tokens = metadata.num_decodes, metadata.num_decode_tokens
        num_prefill_tokens = metadata.num_prefill_tokens
        conv_state, ssm_state = self._state_views()
        weight, bias = self._conv_weight_for_ops(), self.conv1d.bias
        silu = CONV_ACTIVATIONS[self.activation]
        out = output.unflatten(-1, (self.num_heads // self.tp_size, self.head_dim))

        if num_decodes > 0 and self.num_spec > 0:
            self._spec_decode_core(xbc[:num_decode_tokens], dt[:num_decode_tokens], out[:num_decode_tokens],
                                   metadata, weight, bias, silu)
        elif num_decodes > 0:
            decode = slice(0, num_decode_tokens)
            slots = op_slots(metadata.state_indices_tensor_d[:num_decodes, 0])
            cu = torch.arange(num_decodes + 1, dtype=torch.int32, device=xbc.device)
            conv_out = ops.causal_conv1d(xbc[decode], weight, bias, conv_state, slots, cu, silu=silu)
            x, B, C = self._split_heads(conv_out)
            ops.mamba2_state_update(
                x, dt[decode], self.A, B, C, self.D, self.dt_bias, ssm_state, slots, out=out[decode]
            )

        if metadata.num_prefills > 0:
            prefill = slice(num_decode_tokens, num_decode_tokens + num_prefill_tokens)
            slots = op_slots(metadata.state_indices_tensor_p)
            cu = metadata.query_start_loc_p
            has_initial_state = metadata.has_initial_states_p
            checkpoint = metadata.checkpoint_meta
            offsets = checkpoint_slots = None
            if checkpoint is not None:
                offsets = checkpoint.checkpoint_offsets.to(torch.int32)
                # Rows without a checkpoint (offset 0) carry NULL_BLOCK_ID: pass no slot for them.
                checkpoint_slots = torch.where(
                    offsets > 0, checkpoint.state_indices.to(torch.int32), -1
                ).contiguous()
                # Read before the conv op overwrites the rows' conv states.
                conv_history = self._checkpoint_conv_history(
                    xbc[prefill], conv_state, slots, cu, has_initial_state, offsets
                )
            conv_out = ops.causal_conv1d(
                xbc[prefill], weight, bias, conv_state, slots, cu,
                has_initial_state=has_initial_state, silu=silu,
            )
            x, B, C = self._split_heads(conv_out)
            ops.mamba2_chunk_scan(
                x, dt[prefill], self.A, B, C, self.D, self.dt_bias, ssm_state, slots, cu,
                has_initial_state=has_initial_state, checkpoint_offsets=offsets,
                checkpoint_slots=checkpoint_slots, out=out[prefill],
            )
            if checkpoint is not None:
                rows, history = conv_history
                conv_state[checkpoint_slots[rows].long()] = history

    def _spec_decode_core(self, xbc, dt, out, metadata, weight, bias, silu) -> None:
        """Decode rows under speculative decoding (vLLM puts every decoding request here, with
        1 + drafts tokens; ``num_accepted_tokens[i]`` = a says how many tokens of its previous step
        were accepted). Semantics of vLLM's MambaMixer2 (``selective_state_update`` with
        ``num_accepted_tokens``, ``causal_conv1d_update`` sliding window), as in our GDN version
        (vllm_gdn_cpu.layers.gdn_spec_decode):

        * SSM: start from slot ``state_indices_d[i, a-1]``, store the state after token t of this
          step in slot ``state_indices_d[i, t]``: one ``ops.mamba2_state_update`` call per draft
          position (at most S+1), each after copying the previous position's slot into this one's
          (a loop over draft positions, never over sequences or prompt tokens);
        * conv (rolling buffer B of W-1+S columns in the slot ``state_indices_d[i, 0]``): the W-1
          inputs before this step's first token are ``B[a-1 : a-1+W-1]``; afterwards
          ``B[0 : W-2+q_i] = prior[1:] ++ x``, so the next step reads again at its a-1.
        """
        num_seqs = metadata.num_decodes
        cu = metadata.query_start_loc_d[: num_seqs + 1].long()
        spec_idx = metadata.state_indices_tensor_d[:num_seqs].long()
        accepted = metadata.num_accepted_tokens[:num_seqs].long()
        conv_buffer, ssm_state = self._state_views(full_conv_buffer=True)  # [slots, W-1+S, D]
        conv_out = spec_decode_conv(conv_buffer, xbc, weight, bias, silu, cu, spec_idx[:, 0], accepted, self.prefix)

        # SSM: one call per draft position; the state after token t is kept in spec_idx[:, t]
        x, B, C = self._split_heads(conv_out)
        step_out = torch.empty((num_seqs, *out.shape[1:]), dtype=out.dtype)
        spec_decode_states(ssm_state, spec_idx, accepted, cu, out, lambda rows, slots: ops.mamba2_state_update(
            x.index_select(0, rows), dt.index_select(0, rows), self.A, B.index_select(0, rows),
            C.index_select(0, rows), self.D, self.dt_bias, ssm_state, slots, out=step_out,
        ))

    def _checkpoint_conv_history(self, xbc, conv_state, slots, cu, has_initial_state, offsets):
        """(rows, history [R, W-1, conv_dim]): for each prefill row with a checkpoint (offset o > 0),
        the conv state a sequence has after its first o query tokens: the W-1 pre-conv inputs
        before the offset, oldest first; positions before the query come from the row's initial
        conv state (zeros without one)."""
        width = self.conv_kernel_size - 1
        rows = torch.nonzero(offsets > 0).squeeze(1)
        rel = offsets[rows].long()[:, None] - width + torch.arange(width)  # [R, W-1], query-relative
        from_x = xbc[(cu[rows].long()[:, None] + rel.clamp(min=0))]  # [R, W-1, D]
        history = from_x.to(conv_state.dtype)
        before = rel < 0
        if bool(before.any()):
            old = conv_state[slots[rows].long()[:, None], (rel + width).clamp(0, width - 1)]  # [R, W-1, D]
            if has_initial_state is not None:
                # where, not a multiply: a slot without a state may hold NaN garbage
                old = torch.where(has_initial_state[rows][:, None, None], old, 0.0)
            history = torch.where(before[:, :, None], old, history)
        return rows, history


def mamba2_cpu_core(
    projected_states: torch.Tensor,
    output: torch.Tensor,
    layer_name: LayerNameType,
) -> None:
    if (found := step_layer_and_metadata(layer_name)) is not None:
        layer, metadata = found
        layer.forward_core(projected_states, output, metadata)


def _mamba2_cpu_core_fake(
    projected_states: torch.Tensor,
    output: torch.Tensor,
    layer_name: LayerNameType,
) -> None:
    return None


direct_register_custom_op(
    op_name="mamba2_cpu_core",
    op_func=mamba2_cpu_core,
    mutates_args=["output"],
    fake_impl=_mamba2_cpu_core_fake,
)
