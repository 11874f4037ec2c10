"""Speculative decoding (accepted-token rollback) for our GDN layers, on our kernels.

With ``num_speculative_tokens = S`` vLLM gives every decoding request S+1 state slots
(``spec_state_indices_tensor[i]``, ``[N, S+1]``) and a conv buffer of ``W-1+S`` columns, and marks
every decode row as a *spec* row (``spec_sequence_masks``; a row without drafts has one token).
A spec row carries ``q_i = 1 + drafts`` tokens; ``num_accepted_tokens[i]`` = a (1..S+1) says how
many tokens of the row's *previous* step were accepted. Semantics (those of vLLM's FLA kernels and
of its CPU path ``_cpu_gdn_attention_spec_aware``):

* SSM state: start from slot ``spec_idx[i, a-1]`` (the state after the last accepted token of the
  previous step) and store the state after token t of this step in slot ``spec_idx[i, t]``. Done
  here with q_max calls of ``ops.fused_recurrent_gated_delta_rule`` (one token per sequence each,
  gating fused in), each preceded by a copy of the previous token's slot into this token's slot:
  a loop over draft positions (at most S+1), never over sequences or prompt tokens.
* Conv state (rolling buffer ``B``, W-1+S columns): the W-1 inputs before this step's first token
  are ``B[a-1 : a-1+W-1]``; afterwards ``B[0 : W-2+q_i] = prior[1:] ++ x``, so that the history
  ending at token t is ``B[t : t+W-1]`` and the next step again reads at ``a-1``. For q_i = S+1
  this is exactly vLLM's layout (``keep = B[a : a+W-2]`` then the new tokens); it stays correct when
  a row has fewer drafts (vLLM's CPU torch path assumes full rows there). The convolution itself
  runs on ``ops.causal_conv1d`` over the gathered priors.
* Non-spec rows of a spec batch are prompt (chunk) prefills: they run through the layer's ordinary
  ``forward_core`` on the first W-1 buffer columns (``_state_views`` returns that narrow view), as
  vLLM's CPU path does, which is where the first spec step (a = 1) reads.

A dedicated kernel would do the SSM part in one call and avoid the slot copies: a
``fused_recurrent_gated_delta_rule`` variant taking ``state_indices [N, S+1]`` plus
``num_accepted [N]`` that reads the initial state from column ``a-1`` and writes the state after
token t to column t (like vLLM's ``fused_sigmoid_gating_delta_rule_update_spec_cpu``).
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_gdn_cpu import ops
from vllm_gdn_cpu.layers.common import CONV_ACTIVATIONS, spec_decode_conv, spec_decode_states


def forward_core_spec(layer, mixed_qkv, b, a, core_attn_out, metadata) -> None:
    """The GDN core of a step that has spec rows (``metadata.spec_sequence_masks`` set)."""
    num_spec = metadata.num_spec_decodes
    num_non_spec = metadata.num_prefills + metadata.num_decodes
    if num_non_spec == 0:
        spec_rows = None  # spec tokens are the first rows, in order
        num_spec_tokens = int(metadata.spec_query_start_loc[num_spec])
    else:
        spec_rows = metadata.spec_token_indx.long()
        num_spec_tokens = spec_rows.numel()

    def spec_part(x):
        return x[:num_spec_tokens] if spec_rows is None else x.index_select(0, spec_rows)

    if num_spec > 0 and num_spec_tokens > 0:
        out = _spec_rows_core(
            layer, spec_part(mixed_qkv), spec_part(b), spec_part(a), metadata
        ).to(core_attn_out.dtype)
        if spec_rows is None:
            core_attn_out[:num_spec_tokens] = out
        else:
            core_attn_out.index_copy_(0, spec_rows, out)

    if num_non_spec > 0:
        rows = metadata.non_spec_token_indx.long()
        non_spec_meta = dataclasses.replace(
            metadata,
            num_spec_decodes=0,
            num_spec_decode_tokens=0,
            num_actual_tokens=rows.numel(),
            spec_sequence_masks=None,
            spec_token_indx=None,
            non_spec_token_indx=None,
            spec_query_start_loc=None,
            spec_state_indices_tensor=None,
            num_accepted_tokens=None,
        )
        out = torch.zeros(
            (rows.numel(), *core_attn_out.shape[1:]), dtype=core_attn_out.dtype
        )
        layer.forward_core(
            mixed_qkv.index_select(0, rows), b.index_select(0, rows).contiguous(),
            a.index_select(0, rows).contiguous(), out, non_spec_meta,
        )
        core_attn_out.index_copy_(0, rows, out)


def _spec_rows_core(layer, x, b, a, metadata) -> torch.Tensor:
    """Conv + recurrence of the spec rows; x [Ts, D] ordered by ``spec_query_start_loc``."""
    num_seqs = metadata.num_spec_decodes
    cu = metadata.spec_query_start_loc[: num_seqs + 1].long()
    spec_idx = metadata.spec_state_indices_tensor[:num_seqs].long()
    accepted = metadata.num_accepted_tokens[:num_seqs].long()
    num_tokens = x.shape[0]

    conv_buffer, ssm_state = layer._state_views(full_conv_buffer=True)  # [slots, W-1+S, D]
    conv_out = spec_decode_conv(conv_buffer, x, layer._conv_weight_for_ops(), layer.conv1d.bias, _silu(layer), cu,
                                spec_idx[:, 0], accepted, layer.prefix)

    key_dim, value_dim = layer.key_dim // layer.tp_size, layer.value_dim // layer.tp_size
    q, k, v = conv_out.split([key_dim, key_dim, value_dim], dim=-1)
    q, k = q.unflatten(-1, (-1, layer.head_k_dim)), k.unflatten(-1, (-1, layer.head_k_dim))
    v = v.unflatten(-1, (-1, layer.head_v_dim))

    # ---- recurrence: one call per draft position, state of token t kept in slot spec_idx[:, t] ----
    out = torch.zeros(num_tokens, v.shape[1], v.shape[2], dtype=x.dtype)
    step = lambda rows, slots: ops.fused_recurrent_gated_delta_rule(  # noqa: E731
        q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows),
        layer.A_log, layer.dt_bias, a.index_select(0, rows).contiguous(),
        b.index_select(0, rows).contiguous(), ssm_state, slots,
        allow_neg_eigval=layer.allow_neg_eigval,
    )
    spec_decode_states(ssm_state, spec_idx, accepted, cu, out, step)
    return out


def _silu(layer) -> bool:
    return CONV_ACTIVATIONS[layer.activation]
