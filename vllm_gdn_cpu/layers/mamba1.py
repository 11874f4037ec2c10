"""vLLM's ``MambaMixer`` (Mamba-1 layers) with its conv + selective-scan core on our CPU kernels.

vLLM 0.32 cannot run Mamba-1 on CPU at all: its prefill calls ``torch.ops._C.selective_scan_fwd``,
which the CPU build does not have (Mamba, FalconMamba and Jamba fail at the first prompt).
``GDNCPUMambaMixer`` keeps everything of vLLM's ``MambaMixer`` (weights, their TP sharding and
loading, ``A = -exp(A_log)``, ``x_proj`` / ``dt_proj`` and ``_ssm_transform`` with FalconMamba's
weightless and Jamba's weighted RMS norms on dt, B and C, state shapes and dtypes, the MAMBA1
attention backend and its metadata) and replaces the conv1d + SSM core. ``in_proj``, ``x_proj``,
``dt_proj`` and ``out_proj`` run on our small-batch linear engine (``layers.projections``).

Everything is token-major ([T, Dm], no transposes as in vLLM's channel-major path). The core runs
as the custom op ``vllm::mamba1_cpu_core`` (opaque to torch.compile, like vLLM's ``mamba_mixer``),
which reads the step's ``Mamba1AttentionMetadata`` and calls, with no Python loop over tokens or
sequences:

* one ``ops.causal_conv1d`` over the step's decode rows (length-1 sequences, batch order: decodes
  first) and prefill rows together;
* ``x_proj`` / ``dt_proj`` (vLLM's ``_ssm_transform``) once over all those tokens;
* decode rows: ``ops.selective_state_update``; prefill rows (new prompts, chunked-prefill
  continuations, prefix-cache hits, which continue from the slot when ``has_initial_states_p``):
  ``ops.selective_scan``.

Prefix caching ("align" mamba cache mode, vLLM's default when prefix caching is on): unlike
``MambaMixer2``, vLLM's ``MambaMixer`` declares no prefill checkpoint blocks (``MambaBase``'s
``get_kv_cache_spec``), and its metadata builder computes no chunk metadata
(``cu_chunk_seqlen_p`` / ``last_chunk_indices_p`` stay None; the GPU ``selective_scan_fn`` then
writes only each row's final state). What makes the cache work is the scheduler: in align mode it
ends every prefill chunk of a prompt on a block boundary (scheduler ``_mamba_block_aligned_split``
stops), ``state_indices_tensor_p`` names the block holding the chunk's last token, and the final
conv + SSM states written there are the boundary states; vLLM's worker (``mamba_utils``) copies
them into the next block before the next chunk or decode step continues. So the layer stores
exactly what vLLM's GPU path stores: each row's final conv history and SSM state in its slot; the
scan's checkpoint arguments are not needed for Mamba-1. Entries equal to ``NULL_BLOCK_ID`` are
padding for vLLM's kernels (skipped); they are passed to ours as -1 (same meaning).

Refused at layer build with a clear error: speculative decoding (vLLM's ``MambaMixer`` has no
speculative path: its decode ignores ``num_accepted_tokens``) and vLLM's ReplaySSM decode.
"""

from __future__ import annotations

import torch

from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.mamba.mamba_mixer import MambaMixer
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first
from vllm.utils.torch_utils import (
    LayerNameType,
    _encode_layer_name,
    direct_register_custom_op,
)
from vllm.v1.attention.backends.mamba1_attn import Mamba1AttentionMetadata

from vllm_gdn_cpu import ops
from vllm_gdn_cpu.layers.common import CONV_ACTIVATIONS, CPUConvWeights, log_activation, op_slots, step_layer_and_metadata
from vllm_gdn_cpu.layers.projections import install_all


class GDNCPUMambaMixer(CPUConvWeights, MambaMixer):
    """Drop-in for vLLM's ``MambaMixer`` (Mamba, FalconMamba, Jamba), registered with
    ``PluggableLayer.register_oot`` by ``vllm_gdn_cpu.plugin``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.activation not in CONV_ACTIVATIONS:
            raise NotImplementedError(
                f"vllm_gdn_cpu: unsupported MambaMixer conv activation {self.activation!r} in {self.prefix}"
            )
        vllm_config = get_current_vllm_config()
        if vllm_config.num_speculative_tokens > 0:
            raise NotImplementedError(
                f"vllm_gdn_cpu: speculative decoding of Mamba-1 layers ({self.prefix}) is not supported: "
                "vLLM's MambaMixer has no speculative decode path (its decode ignores the accepted-token "
                "counts). Run without --speculative-config"
            )
        if getattr(vllm_config.cache_config, "use_replayssm", False):
            raise NotImplementedError(
                "vllm_gdn_cpu: --use-replayssm is not supported for Mamba-1 layers by the GDN_CPU "
                "backend (vLLM's ReplaySSM decode kernels are Triton/FlashInfer)"
            )
        projections = install_all({
            "in_proj": self.in_proj, "x_proj": self.x_proj, "dt_proj": self.dt_proj, "out_proj": self.out_proj,
        })
        log_activation("MambaMixer", projections=projections)

    def forward(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        """vLLM's ``MambaMixer.forward`` (writes ``output``), token-major, with our core op."""
        projected_states, _ = self.in_proj(hidden_states)  # [T, 2 Dm]: x | gate
        # zeros, not empty: rows past the step's real tokens (padding) are never written by the core
        # but still go through out_proj.
        scan_out = torch.zeros(
            (hidden_states.shape[0], projected_states.shape[-1] // 2),
            dtype=hidden_states.dtype,
            device=hidden_states.device,
        )
        torch.ops.vllm.mamba1_cpu_core(projected_states, scan_out, _encode_layer_name(self.prefix))
        out, _ = self.out_proj(scan_out)
        output.copy_(out)

    # -- state views -------------------------------------------------------------------------

    def _state_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv_state [slots, W-1, Dm], ssm_state [slots, Dm, N]) views of the cache, as our ops
        take them (the conv state is a transposed view in vLLM's dim-first layout)."""
        conv_state, ssm_state = self.kv_cache[0], self.kv_cache[1]
        if is_conv_state_dim_first():
            conv_state = conv_state.transpose(-1, -2)
        return conv_state, ssm_state

    def _dt_bias(self) -> torch.Tensor | None:
        """dt_proj's bias (added inside the scan), as float32 (vLLM's ``_time_proj_bias``), cached."""
        bias = getattr(self.dt_proj, "bias", None)
        if bias is None:
            return None
        key = (bias.data_ptr(), bias._version)
        cached = getattr(self, "_dt_bias_f32", None)
        if cached is None or cached[0] != key:
            cached = (key, bias.detach().float().contiguous())
            self._dt_bias_f32 = cached
        return cached[1]

    # -- the core ------------------------------------------------------------------------------

    def forward_core(
        self, projected_states: torch.Tensor, output: torch.Tensor, metadata: Mamba1AttentionMetadata
    ) -> None:
        """Conv1d + selective scan for one step: writes output[:num_actual_tokens] and the states."""
        num_decodes, num_decode_tokens = metadata.num_decodes, metadata.num_decode_tokens
        num_prefills, num_prefill_tokens = metadata.num_prefills, metadata.num_prefill_tokens
        num_tokens = num_decode_tokens + num_prefill_tokens
        if num_tokens == 0:
            return
        dim = projected_states.shape[-1] // 2
        x, gate = projected_states[:num_tokens, :dim], projected_states[:num_tokens, dim:]
        conv_state, ssm_state = self._state_views()
        device = projected_states.device

        # One conv call over decode rows (length-1 sequences continuing from their state) and
        # prefill rows (continuing where has_initial_states_p); concatenated only in mixed steps.
        slots_d = slots_p = cu_p = None
        if num_decodes > 0:
            slots_d = op_slots(metadata.state_indices_tensor_d[:num_decodes, 0])
            cu_d = torch.arange(num_decodes + 1, dtype=torch.int32, device=device)
        if num_prefills > 0:
            slots_p = op_slots(metadata.state_indices_tensor_p[:num_prefills])
            cu_p = metadata.query_start_loc_p.to(torch.int32)
        if num_prefills == 0:
            slots, cu, has_initial = slots_d, cu_d, None  # None: every row continues
        elif num_decodes == 0:
            slots, cu, has_initial = slots_p, cu_p, metadata.has_initial_states_p
        else:
            slots = torch.cat([slots_d, slots_p])
            cu = torch.cat([cu_d[:-1], cu_p + num_decode_tokens])
            has_initial = torch.cat([
                torch.ones(num_decodes, dtype=torch.bool, device=device), metadata.has_initial_states_p
            ])
        conv_out = ops.causal_conv1d(
            x, self._conv_weight_for_ops(), self.conv1d.bias, conv_state, slots, cu,
            has_initial_state=has_initial, silu=CONV_ACTIVATIONS[self.activation],
        )

        # vLLM's x_proj / norms / dt_proj (channel-major view of a token-major dt: undone here).
        dt, B, C = self._ssm_transform(conv_out)
        dt = dt.transpose(-2, -1)  # [T, Dm]; B, C [T, N]
        dt_bias = self._dt_bias()

        if num_decodes > 0:
            d = slice(0, num_decode_tokens)
            ops.selective_state_update(
                conv_out[d], dt[d], self.A, B[d], C[d], self.D, gate[d], dt_bias, ssm_state, slots_d,
                dt_softplus=True, out=output[d],
            )
        if num_prefills > 0:
            p = slice(num_decode_tokens, num_tokens)
            ops.selective_scan(
                conv_out[p], dt[p], self.A, B[p], C[p], self.D, gate[p], dt_bias, ssm_state, slots_p, cu_p,
                has_initial_state=metadata.has_initial_states_p, dt_softplus=True, out=output[p],
            )


def mamba1_cpu_core(
    projected_states: torch.Tensor,
    output: torch.Tensor,
    layer_name: LayerNameType,
) -> None:
    if (found := step_layer_and_metadata(layer_name)) is not None:
        layer, metadata = found
        layer.forward_core(projected_states, output, metadata)


def _mamba1_cpu_core_fake(
    projected_states: torch.Tensor,
    output: torch.Tensor,
    layer_name: LayerNameType,
) -> None:
    return None


direct_register_custom_op(
    op_name="mamba1_cpu_core",
    op_func=mamba1_cpu_core,
    mutates_args=["output"],
    fake_impl=_mamba1_cpu_core_fake,
)
