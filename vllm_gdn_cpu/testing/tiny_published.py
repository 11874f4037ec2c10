"""Checkpoints at the published models' per-layer shapes, with layers and experts reduced to fit a
small CPU: one entry per model family served by the plugin (the "published shapes" test matrix).

Every per-layer size of each flagship checkpoint is kept (hidden size, attention and linear-attention
heads and head dims, state sizes, conv widths, MLP and expert intermediate sizes, top-k, MLA ranks);
reduced are the layer count (one layer of each kind the model has, in its order), the routed-expert
count (never below top-k) and the vocabulary (1024 entries: the embedding is no per-layer shape and
would dominate memory). ``SHAPES[name].source`` says where the numbers come from: the published
``config.json`` of that checkpoint as recorded here (there is no hub access on these machines to
re-read them), or transformers' config defaults where those are the flagship's.

``write_config(name, dir)`` writes only ``config.json`` (for vLLM's ``load_format="dummy"``);
``build_checkpoint(name, dir)`` also writes random weights (fixed seed, float32) for a comparison
with HF transformers' own forward.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import torch

VOCAB_SIZE = 1024
SEED = 1234
EOS, PAD, BOS = 2, 0, 1


@dataclass(frozen=True)
class Published:
    """One family's flagship at its per-layer shapes."""

    model: str  # the published checkpoint the shapes are from
    family: str  # the state layer family our plugin serves it with
    layer_class: str  # the vLLM layer class our plugin replaces (its INFO line names it)
    architecture: str
    config: Callable[[], object]  # -> transformers config (reduced layers/experts)
    source: str
    moe: str = ""  # what of the MoE is kept, for the docs
    vllm_fields: Callable[[object], dict] | None = None  # extra config.json fields vLLM reads
    notes: dict = field(default_factory=dict)


def _common(architecture: str) -> dict:
    return dict(vocab_size=VOCAB_SIZE, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS,
                tie_word_embeddings=False, architectures=[architecture])


def qwen3_next_80b_a3b():
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        hidden_size=2048, intermediate_size=5120, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, num_experts=16, num_experts_per_tok=10, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, partial_rotary_factor=0.25, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"], max_position_embeddings=4096,
        **_common("Qwen3NextForCausalLM"))


def qwen3_5_dense():
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        hidden_size=4096, intermediate_size=12288, num_attention_heads=16, num_key_value_heads=4, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
        max_position_embeddings=4096, **_common("Qwen3_5ForCausalLM"))


def qwen3_5_moe():
    from transformers import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(
        hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, num_experts=16, num_experts_per_tok=8, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
        max_position_embeddings=4096, **_common("Qwen3_5MoeForCausalLM"))


def olmo_hybrid():
    from transformers import OlmoHybridConfig

    return OlmoHybridConfig(
        hidden_size=3840, intermediate_size=11008, num_attention_heads=30, num_key_value_heads=30,
        linear_num_key_heads=30, linear_num_value_heads=30, linear_key_head_dim=96, linear_value_head_dim=192,
        linear_conv_kernel_dim=4, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
        max_position_embeddings=4096, **_common("OlmoHybridForCausalLM"))


def granite_4_0_h_tiny():
    from transformers import GraniteMoeHybridConfig

    return GraniteMoeHybridConfig(
        hidden_size=1536, intermediate_size=512, num_attention_heads=12, num_key_value_heads=4,
        num_local_experts=8, num_experts_per_tok=6, shared_intermediate_size=1024,
        mamba_n_heads=48, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2,
        position_embedding_type="nope", num_hidden_layers=2, layer_types=["mamba", "attention"],
        max_position_embeddings=4096, **_common("GraniteMoeHybridForCausalLM"))


def nemotron_h_8b():
    from transformers import NemotronHConfig

    return NemotronHConfig(
        hidden_size=4096, intermediate_size=21504, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, expand=2,
        mlp_hidden_act="relu2", layers_block_type=["mamba", "mlp", "attention", "mlp"],
        max_position_embeddings=4096, **_common("NemotronHForCausalLM"))


def falcon_h1_1_5b():
    from transformers import FalconH1Config

    return FalconH1Config(
        hidden_size=2048, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        mamba_d_ssm=3072, mamba_n_heads=24, mamba_d_head=128, mamba_d_state=256, mamba_n_groups=1,
        mamba_d_conv=4, mamba_expand=2, num_hidden_layers=1, max_position_embeddings=4096,
        **_common("FalconH1ForCausalLM"))


def zamba2_1_2b():
    from transformers import Zamba2Config

    return Zamba2Config(
        hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32,
        attention_head_dim=128, mamba_d_state=128, mamba_headdim=64, n_mamba_heads=64, mamba_ngroups=1,
        mamba_d_conv=4, mamba_expand=2, num_mem_blocks=1, use_shared_attention_adapter=True, adapter_rank=128,
        use_mem_rope=True, num_hidden_layers=2, layers_block_type=["mamba", "hybrid"], max_position_embeddings=4096,
        **_common("Zamba2ForCausalLM"))


def mamba2_2_7b():
    from transformers import Mamba2Config

    return Mamba2Config(
        hidden_size=2560, num_heads=80, head_dim=64, expand=2, state_size=128, n_groups=1, conv_kernel=4,
        use_bias=False, use_conv_bias=True, num_hidden_layers=1, **_common("Mamba2ForCausalLM"))


def mamba_2_8b():
    from transformers import MambaConfig

    return MambaConfig(hidden_size=2560, intermediate_size=5120, state_size=16, conv_kernel=4, expand=2,
                       time_step_rank=160, num_hidden_layers=1, **_common("MambaForCausalLM"))


def falcon_mamba_7b():
    from transformers import FalconMambaConfig

    return FalconMambaConfig(hidden_size=4096, intermediate_size=8192, state_size=16, conv_kernel=4, expand=2,
                             time_step_rank=256, mixer_rms_eps=1e-6, num_hidden_layers=1,
                             **_common("FalconMambaForCausalLM"))


def jamba_v0_1():
    from transformers import JambaConfig

    # Jamba-v0.1: attention every 8th layer (offset 4), MoE every 2nd (offset 1); two layers here:
    # mamba + dense MLP, then attention + MoE.
    return JambaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_experts=2, num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256,
        num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        max_position_embeddings=4096, **_common("JambaForCausalLM"))


def kimi_linear_48b_a3b():
    from transformers import KimiLinearConfig

    # layer 1: KDA + dense MLP (first_k_dense_replace 1); layer 2: MLA + MoE (routed + shared).
    return KimiLinearConfig(
        hidden_size=2304, intermediate_size=9216, moe_intermediate_size=1024, num_attention_heads=32,
        num_key_value_heads=32, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, num_local_experts=16, num_experts_per_tok=8, n_shared_experts=1,
        routed_scaling_factor=2.446, n_group=1, topk_group=1, norm_topk_prob=True,
        linear_num_heads=32, linear_head_dim=128, linear_conv_kernel_dim=4, rms_norm_eps=1e-5,
        num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
        max_position_embeddings=4096, **_common("KimiLinearForCausalLM"))


def _kimi_vllm_fields(config) -> dict:
    from vllm_gdn_cpu.testing.tiny_kimi import _vllm_config_fields

    return _vllm_config_fields(config)


RECORDED = "published config.json (recorded; no hub access here to re-read it)"
SHAPES: dict[str, Published] = {
    "qwen3-next-80b-a3b": Published("Qwen/Qwen3-Next-80B-A3B-Instruct", "GDN", "QwenGatedDeltaNetAttention",
                                    "Qwen3NextForCausalLM", qwen3_next_80b_a3b, RECORDED,
                                    moe="512 -> 16 routed experts, top-10, shared expert"),
    "qwen3.5-dense": Published("Qwen3.5 dense (transformers' Qwen3_5TextConfig defaults)", "GDN",
                               "QwenGatedDeltaNetAttention", "Qwen3_5ForCausalLM", qwen3_5_dense,
                               "transformers 5.19 Qwen3_5TextConfig defaults"),
    "qwen3.5-moe": Published("Qwen3.5 MoE text (transformers' Qwen3_5MoeTextConfig defaults)", "GDN",
                             "QwenGatedDeltaNetAttention", "Qwen3_5MoeForCausalLM", qwen3_5_moe,
                             "transformers 5.19 Qwen3_5MoeTextConfig defaults",
                             moe="256 -> 16 routed experts, top-8, shared expert"),
    "olmo-hybrid": Published("OLMo-hybrid (transformers' OlmoHybridConfig defaults)", "GDN",
                             "OlmoHybridGatedDeltaNetAttention", "OlmoHybridForCausalLM", olmo_hybrid,
                             "transformers 5.19 OlmoHybridConfig defaults"),
    "granite-4.0-h-tiny": Published("ibm-granite/granite-4.0-h-tiny", "Mamba2", "MambaMixer2",
                                    "GraniteMoeHybridForCausalLM", granite_4_0_h_tiny, RECORDED,
                                    moe="64 -> 8 routed experts, top-6, shared expert"),
    "nemotron-h-8b": Published("nvidia/Nemotron-H-8B-Base-8K", "Mamba2", "MambaMixer2", "NemotronHForCausalLM",
                               nemotron_h_8b, RECORDED + "; = transformers' NemotronHConfig defaults"),
    "falcon-h1-1.5b": Published("tiiuae/Falcon-H1-1.5B-Instruct", "Mamba2", "MambaMixer2", "FalconH1ForCausalLM",
                                falcon_h1_1_5b, RECORDED),
    "zamba2-1.2b": Published("Zyphra/Zamba2-1.2B", "Mamba2", "MambaMixer2", "Zamba2ForCausalLM", zamba2_1_2b,
                             RECORDED),
    "mamba2-2.7b": Published("state-spaces/mamba2-2.7b", "Mamba2", "MambaMixer2", "Mamba2ForCausalLM",
                             mamba2_2_7b, RECORDED),
    "mamba-2.8b": Published("state-spaces/mamba-2.8b-hf", "Mamba-1", "MambaMixer", "MambaForCausalLM",
                            mamba_2_8b, RECORDED),
    "falcon-mamba-7b": Published("tiiuae/falcon-mamba-7b", "Mamba-1", "MambaMixer", "FalconMambaForCausalLM",
                                 falcon_mamba_7b, RECORDED),
    "jamba-v0.1": Published("ai21labs/Jamba-v0.1", "Mamba-1", "MambaMixer", "JambaForCausalLM", jamba_v0_1,
                            RECORDED + "; = transformers' JambaConfig defaults",
                            moe="16 -> 2 routed experts, top-2"),
    "kimi-linear-48b-a3b": Published("moonshotai/Kimi-Linear-48B-A3B-Instruct", "KDA", "KimiGatedDeltaNetAttention",
                                     "KimiLinearForCausalLM", kimi_linear_48b_a3b,
                                     "transformers 5.19 KimiLinearConfig defaults (its docstring's checkpoint)",
                                     moe="256 -> 16 routed experts, top-8, shared expert, sigmoid + bias router",
                                     vllm_fields=_kimi_vllm_fields),
}


def transformers_config(name: str):
    config = SHAPES[name].config()
    config.architectures = [SHAPES[name].architecture]
    return config


def write_config(name: str, directory: Union[str, Path], dtype: torch.dtype = torch.bfloat16) -> Path:
    """config.json only (vLLM ``load_format="dummy"``): ``name``'s shapes. Idempotent."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    config = transformers_config(name)
    config.dtype = dtype
    config.save_pretrained(directory)
    _add_vllm_fields(name, config, directory)
    return directory


def _add_vllm_fields(name: str, config, directory: Path) -> None:
    extra = SHAPES[name].vllm_fields
    if extra is None:
        return
    saved = json.loads((directory / "config.json").read_text())
    saved.update(extra(config))
    (directory / "config.json").write_text(json.dumps(saved, indent=2))


def _spread_decays(model) -> None:
    """Mamba2/GDN-style layers (per-head A_log and dt_bias): A = exp(A_log) log-uniform in [0.05, 4],
    dt = softplus(dt_bias) log-uniform in [0.005, 0.5], so the state matters (as tiny_mamba2)."""
    generator = torch.Generator().manual_seed(SEED)
    for module in model.modules():
        if not (hasattr(module, "A_log") and hasattr(module, "dt_bias")) or module.A_log.dim() != 1:
            continue
        heads = module.A_log.shape
        a = torch.empty(heads).uniform_(math.log(0.05), math.log(4.0), generator=generator).exp()
        dt = torch.empty(module.dt_bias.shape).uniform_(math.log(0.005), math.log(0.5), generator=generator).exp()
        with torch.no_grad():
            module.A_log.copy_(a.log())
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def build_checkpoint(name: str, directory: Union[str, Path]) -> Path:
    """config.json plus random float32 weights (fixed seed) of ``name``'s shapes. Idempotent."""
    import transformers

    directory = Path(directory)
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        return directory
    config = transformers_config(name)
    config.dtype = torch.float32
    torch.manual_seed(SEED)
    model = getattr(transformers, SHAPES[name].architecture)(config).to(torch.float32)
    _spread_decays(model)
    if SHAPES[name].vllm_fields is not None:
        raise NotImplementedError(f"{name}: use its family's tiny builder for real weights")
    model.save_pretrained(directory)
    transformers.GenerationConfig(eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS).save_pretrained(directory)
    return directory


__all__ = ["SHAPES", "Published", "build_checkpoint", "transformers_config", "write_config"]
