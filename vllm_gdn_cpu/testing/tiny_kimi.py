"""Tiny random Kimi-Linear checkpoints, built locally (no network) for tests.

Kimi-Linear in miniature: 4 decoder layers, KDA (Kimi Delta Attention) in layers 1, 2 and 4 and
MLA (multi-head latent attention, NoPE) in layer 3, dense MLPs; 2 KDA heads of head_dim 64. The
decays are spread (A = exp(A_log) in [0.01, 1] per head as for our GDN checkpoints, and dt_bias per
channel so that softplus(dt_bias) runs from ~0.02 to ~2): some channels keep a long memory, others
forget within a few tokens, so the recurrence and its per-channel decay matter.

The checkpoint is written by hand in the original Kimi-Linear naming, which is what vLLM 0.32's
``KimiLinearModel.load_weights`` maps (``self_attn.{q,k,v}_conv1d``, ``self_attn.f_a_proj``/
``f_b_proj``/``A_log``/``dt_bias`` on the attention module) and what transformers' loader converts
back (its ``kimi_linear`` conversion mapping concatenates the conv taps and moves the gate weights
under ``forget_gate``). ``config.json`` carries both configs' fields: transformers' (``layer_types``,
``linear_*``, ``mlp_layer_types``) and vLLM's (``linear_attn_config`` with 1-based ``kda_layers`` /
``full_attn_layers``, ``mla_use_nope``, ``first_k_dense_replace`` past the last layer: no MoE layer).

With ``moe=True`` the checkpoint has Kimi-Linear's MoE as published: layer 1 dense, the others MoE
(``first_k_dense_replace`` 1, ``moe_layer_freq`` 1) with routed experts plus one shared expert, and
the published router: sigmoid scores, ``e_score_correction_bias`` (random here: without it 18-41% of
the tokens of a 200-token prompt get other experts, per MoE layer), grouped top-k, renormalised weights times ``routed_scaling_factor`` 2.446. In miniature:
8 experts in 4 groups, 2 groups then 2 experts per token (the 48B model: 256 experts, 8 per token,
one group). Tensors in the original naming (``block_sparse_moe.gate.weight``,
``block_sparse_moe.gate.e_score_correction_bias``, ``block_sparse_moe.experts.<e>.w1/w2/w3.weight``,
``block_sparse_moe.shared_experts.{gate,up,down}_proj.weight``), which transformers' conversion
mapping merges back into its ``mlp.experts.gate_up_proj``/``down_proj``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Union

import torch

from vllm_gdn_cpu.testing.tiny_models import INIT_GAIN, SEED, _is_saved, random_model

LAYER_TYPES = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
KDA_HEADS, KDA_HEAD_DIM, CONV_WIDTH = 2, 64, 4
# The MoE variant: routed experts, their groups, experts per token and groups per token.
MOE = dict(num_experts=8, num_expert_group=4, num_experts_per_token=2, topk_group=2,
           moe_intermediate_size=64, num_shared_experts=1, routed_scaling_factor=2.446)


def tiny_kimi_linear_config(vocab_size: int, eos_token_id: int, pad_token_id: int, dtype: torch.dtype,
                            layer_types: list[str] = LAYER_TYPES, moe: bool = False):
    from transformers import KimiLinearConfig

    experts = dict(
        mlp_layer_types=["dense"] + ["sparse"] * (len(layer_types) - 1),
        num_local_experts=MOE["num_experts"], n_group=MOE["num_expert_group"],
        num_experts_per_tok=MOE["num_experts_per_token"], topk_group=MOE["topk_group"],
        moe_intermediate_size=MOE["moe_intermediate_size"], n_shared_experts=MOE["num_shared_experts"],
        routed_scaling_factor=MOE["routed_scaling_factor"], norm_topk_prob=True,
    ) if moe else dict(mlp_layer_types=["dense"] * len(layer_types))
    return KimiLinearConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=len(layer_types),
        num_attention_heads=2,
        num_key_value_heads=2,
        # vLLM's AMX MLA kernels (our "latent" MLA form) take only kv_lora_rank + qk_rope_head_dim = 576
        # (Kimi-Linear's 512 + 64); the "decompressed" form's head: 32 + 64 = 96, a CPU_ATTN size
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_nope_head_dim=32,
        qk_rope_head_dim=64,
        v_head_dim=32,
        layer_types=layer_types,
        **experts,
        linear_num_heads=KDA_HEADS,
        linear_head_dim=KDA_HEAD_DIM,
        linear_conv_kernel_dim=CONV_WIDTH,
        rms_norm_eps=1e-5,  # vLLM's KDA output norm uses 1e-5 whatever the config says
        max_position_embeddings=4096,
        initializer_range=0.02 * INIT_GAIN,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        dtype=dtype,
    )


def _spread_channel_decays(model) -> None:
    """dt_bias per channel uniform in [-4, 2]: softplus from ~0.018 to ~2.1."""
    generator = torch.Generator().manual_seed(SEED + 1)
    for module in model.modules():
        if hasattr(module, "A_log") and hasattr(module, "dt_bias"):
            with torch.no_grad():
                module.dt_bias.copy_(torch.empty(module.dt_bias.shape).uniform_(-4.0, 2.0, generator=generator))


def _spread_router_bias(model) -> None:
    """e_score_correction_bias (HF initialises it to zeros) in [-0.1, 0.1]: about the spread of the
    sigmoid scores of the tiny router, so the bias changes which experts are chosen."""
    generator = torch.Generator().manual_seed(SEED + 2)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.empty(buffer.shape).uniform_(-0.1, 0.1, generator=generator))


def _checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """The model's parameters in the original Kimi-Linear checkpoint naming."""
    proj = KDA_HEADS * KDA_HEAD_DIM
    sparse = {i for i, kind in enumerate(model.config.mlp_layer_types) if kind == "sparse"}
    tensors = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if name.endswith("self_attn.conv1d.weight"):
            base = name[: -len("conv1d.weight")]
            for part, piece in zip("qkv", tensor.split(proj)):
                tensors[f"{base}{part}_conv1d.weight"] = piece.contiguous()
        elif parts[:2] == ["model", "layers"] and parts[3] == "mlp" and int(parts[2]) in sparse:
            base = ".".join(parts[:3] + ["block_sparse_moe"])
            rest = ".".join(parts[4:])
            if rest == "experts.gate_up_proj":  # [E, 2I, H]: w1 (gate) rows, then w3 (up)
                for expert, (w1, w3) in enumerate(t.chunk(2, dim=0) for t in tensor):
                    tensors[f"{base}.experts.{expert}.w1.weight"] = w1.contiguous()
                    tensors[f"{base}.experts.{expert}.w3.weight"] = w3.contiguous()
            elif rest == "experts.down_proj":  # [E, H, I]
                for expert, w2 in enumerate(tensor):
                    tensors[f"{base}.experts.{expert}.w2.weight"] = w2.contiguous()
            else:  # gate.weight, gate.e_score_correction_bias, shared_experts.*
                tensors[f"{base}.{rest}"] = tensor.contiguous()
        else:
            tensors[name.replace("self_attn.forget_gate.", "self_attn.")] = tensor.contiguous()
    return tensors


def _vllm_config_fields(config) -> dict:
    types = config.layer_types
    moe = {}
    if "sparse" in config.mlp_layer_types:
        first_sparse = config.mlp_layer_types.index("sparse")
        assert all(kind == "sparse" for kind in config.mlp_layer_types[first_sparse:])
        moe = {
            "num_experts": config.num_local_experts,
            "num_experts_per_token": config.num_experts_per_tok,
            "num_shared_experts": config.n_shared_experts,
            "moe_intermediate_size": config.moe_intermediate_size,
            "first_k_dense_replace": first_sparse,
            "moe_layer_freq": 1,
            "use_grouped_topk": True,
            "num_expert_group": config.n_group,
            "topk_group": config.topk_group,
            "moe_renormalize": config.norm_topk_prob,
            "moe_router_activation_func": "sigmoid",
            "routed_scaling_factor": config.routed_scaling_factor,
        }
    return {
        "architectures": ["KimiLinearForCausalLM"],
        "model_type": "kimi_linear",
        "linear_attn_config": {
            "kda_layers": [i + 1 for i, t in enumerate(types) if t == "linear_attention"],
            "full_attn_layers": [i + 1 for i, t in enumerate(types) if t == "full_attention"],
            "head_dim": config.linear_head_dim,
            "num_heads": config.linear_num_heads,
            "short_conv_kernel_size": config.linear_conv_kernel_dim,
        },
        "mla_use_nope": True,
        # transformers wants an int expert count; vLLM makes layer i MoE only from
        # first_k_dense_replace on: none here (transformers: mlp_layer_types all "dense").
        "num_experts": 2,
        "num_experts_per_token": 1,
        "first_k_dense_replace": len(types),
        **moe,
    }


def build_tiny_kimi_linear(directory: Union[str, Path], dtype: torch.dtype = torch.float32, *,
                           layer_types: list[str] = LAYER_TYPES, moe: bool = False) -> Path:
    """Builds a tiny random Kimi-Linear checkpoint plus tokenizer into ``directory`` (idempotent);
    ``layer_types``: one of "linear_attention" (KDA) / "full_attention" (MLA) per layer; ``moe``:
    layer 1 dense, the others MoE with the published router (module docstring)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, KimiLinearForCausalLM

    directory = Path(directory)
    if _is_saved(directory, "config.json") and _is_saved(directory, "model.safetensors"):
        return directory
    make_config = functools.partial(tiny_kimi_linear_config, layer_types=list(layer_types), moe=moe)
    config, model = random_model(directory, make_config, KimiLinearForCausalLM, torch.float32)
    _spread_channel_decays(model)
    with torch.no_grad():
        _spread_router_bias(model)
    model = model.to(dtype)
    config.save_pretrained(directory)
    saved = json.loads((directory / "config.json").read_text())
    saved.update(_vllm_config_fields(config))
    (directory / "config.json").write_text(json.dumps(saved, indent=2))
    GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id).save_pretrained(directory)
    save_file(_checkpoint_tensors(model), directory / "model.safetensors", metadata={"format": "pt"})
    return directory


__all__ = ["LAYER_TYPES", "build_tiny_kimi_linear", "tiny_kimi_linear_config"]
