"""Prefix caching with VLLM_ATTENTION_BACKEND=GDN_CPU: prompts that share a long prefix.

vLLM 0.32 caches hybrid models' prefixes in its "align" mamba cache mode: at block boundaries it
keeps the GDN conv/SSM states of the prefix in cache blocks and, on a hit, copies them into the new
request's slot (per-type copy functions keyed by ``mamba_type`` GDN_ATTN, which the plugin keeps)
and schedules only the uncached tail, which our core then continues from that state
(``has_initial_state`` True). If the restored state were wrong, the greedy output would differ from
the engine without prefix caching.
"""

from __future__ import annotations

import random

import pytest
import torch

from test_e2e_qwen3_next import gdn_cpu_llm, vllm_generate  # noqa: E402

from vllm_gdn_cpu.layers.gdn import GDNCPUQwenGatedDeltaNetAttention  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PREFIX_LEN = 400
SUFFIX_LENGTHS = (3, 20, 70, 130)


@pytest.fixture(scope="module")
def shared_prefix_prompts() -> list[list[int]]:
    rng = random.Random(7)
    prefix = [rng.randrange(3, 800) for _ in range(PREFIX_LEN)]
    return [prefix + [rng.randrange(3, 800) for _ in range(n)] for n in SUFFIX_LENGTHS]


def run_one_by_one(llm, prompts):
    """One request at a time, so later ones can hit the prefix cached by the first."""
    outputs = [vllm_generate(llm, [p])[0] for p in prompts]
    return [list(o.outputs[0].token_ids) for o in outputs], [o.num_cached_tokens for o in outputs]


def prefix_cache_counters(llm) -> dict[str, int]:
    return {
        m.name.removeprefix("vllm:prefix_cache_"): int(m.value)
        for m in llm.get_metrics()
        if m.name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")
    }


@pytest.fixture(scope="module")
def reference_tokens(tiny_qwen3_next_dir, shared_prefix_prompts):
    with gdn_cpu_llm(tiny_qwen3_next_dir, "float32", enable_prefix_caching=False) as llm:
        tokens, cached = run_one_by_one(llm, shared_prefix_prompts)
    assert not any(cached)
    return tokens


def test_shared_prefixes_same_output_with_and_without_prefix_caching(
    tiny_qwen3_next_dir, shared_prefix_prompts, reference_tokens, monkeypatch
):
    prefills = []  # (prefill lengths, continues from a state) of every core call
    forward_core = GDNCPUQwenGatedDeltaNetAttention.forward_core

    def recording(self, mixed_qkv, b, a, core_attn_out, metadata):
        n_dec, n_pre = metadata.num_decodes, metadata.num_prefills
        if n_pre and self.prefix.endswith("layers.0.linear_attn"):
            cu = metadata.non_spec_query_start_loc[n_dec : n_dec + n_pre + 1]
            prefills.append((cu.diff().tolist(), metadata.has_initial_state[n_dec : n_dec + n_pre].tolist()))
        return forward_core(self, mixed_qkv, b, a, core_attn_out, metadata)

    monkeypatch.setattr(GDNCPUQwenGatedDeltaNetAttention, "forward_core", recording)
    with gdn_cpu_llm(
        tiny_qwen3_next_dir, "float32", enable_prefix_caching=True, mamba_cache_mode="align",
        disable_log_stats=False,
    ) as llm:
        tokens, cached = run_one_by_one(llm, shared_prefix_prompts)
        counters = prefix_cache_counters(llm)

    print(f"prefix caching: cached tokens per request {cached}, counters {counters}")
    for suffix, got, want in zip(SUFFIX_LENGTHS, tokens, reference_tokens):
        assert got == want, f"prefix + {suffix}: with prefix caching {got} != without {want}"
    assert cached[0] == 0 and all(c > 0 for c in cached[1:]), "no prefix cache hit"
    assert counters.get("hits", 0) > 0
    # The hits really skipped the prefix: each later request was prefilled only from its cached
    # length on, continuing from the restored state (has_initial_state True).
    continued = {length for lengths, conts in prefills for length, cont in zip(lengths, conts) if cont}
    # (A tail may be cut in two chunks at vLLM's 128-token chunk alignment.)
    for suffix, hit in zip(SUFFIX_LENGTHS[1:], cached[1:]):
        tail = PREFIX_LEN + suffix - hit
        assert tail in continued or any(tail - c in continued for c in continued), (
            f"prefix + {suffix}: the {tail}-token tail was not prefilled from the restored state"
        )
