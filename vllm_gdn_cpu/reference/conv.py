"""Plain-torch reference of ops.causal_conv1d."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    state_indices: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor | None,
    apply_silu: bool,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of ops.causal_conv1d: depthwise causal conv1d over a varlen batch that continues
    from, and updates, a cached state.

    x [T, D]: the tokens of N sequences back to back (``cu_seqlens`` int [N+1]); weight [D, W];
    bias [D] or None; conv_state [slots, W-1, D] (any strides): the last W-1 inputs of each
    sequence, oldest first; state_indices int [N] (< 0: padding, state neither read nor written);
    has_initial_state bool [N] (None: all True; False starts from zeros). Decode is the case of
    sequences of length 1. Returns [T, D] in x's dtype, accumulated in ``compute_dtype``.

    No loop over tokens or sequences: each sequence is laid out behind its W-1 history rows in one
    buffer, so every output row is a fixed-offset window of that buffer and no window straddles two
    sequences; the loop below runs over the W kernel taps.
    """
    num_tokens, dim = x.shape
    history_len = weight.shape[1] - 1
    num_seqs = state_indices.shape[0]
    cu_seqlens = cu_seqlens.long()
    seq_ids = torch.arange(num_seqs)
    history_offsets = torch.arange(history_len)

    token_seq = torch.repeat_interleave(seq_ids, cu_seqlens.diff(), output_size=num_tokens)
    # Sequence i occupies rows [cu[i] + i*(W-1), cu[i+1] + (i+1)*(W-1)) of the buffer: its W-1
    # history rows, then its tokens.
    token_rows = torch.arange(num_tokens) + (token_seq + 1) * history_len
    history_rows = (cu_seqlens[:-1] + seq_ids * history_len)[:, None] + history_offsets
    last_rows = (cu_seqlens[1:] + seq_ids * history_len)[:, None] + history_offsets

    is_real = state_indices >= 0
    slots = state_indices.clamp(min=0).long()
    starts_from_state = is_real if has_initial_state is None else is_real & has_initial_state
    history = conv_state[slots].to(compute_dtype)
    # where, not multiply: an unused cache slot may hold NaN garbage, and NaN * 0 is NaN.
    history = torch.where(starts_from_state[:, None, None], history, 0.0)

    buffer = torch.empty(num_tokens + num_seqs * history_len, dim, dtype=compute_dtype)
    buffer[token_rows] = x.to(compute_dtype)
    buffer[history_rows.flatten()] = history.flatten(0, 1)

    taps = weight.to(compute_dtype)
    out = buffer.index_select(0, token_rows - history_len) * taps[:, 0]
    for tap in range(1, history_len + 1):
        out.addcmul_(buffer.index_select(0, token_rows - history_len + tap), taps[:, tap])
    if bias is not None:
        out += bias.to(compute_dtype)
    if apply_silu:
        F.silu(out, inplace=True)

    conv_state[slots[is_real]] = buffer[last_rows[is_real]].to(conv_state.dtype)
    return out.to(x.dtype)
