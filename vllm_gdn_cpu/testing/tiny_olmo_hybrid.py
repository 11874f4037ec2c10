"""Tiny random OLMo-hybrid checkpoints, built locally (no network) for tests.

Shapes follow OLMo-Hybrid-7B's GDN layers in miniature: key head dim 96, value head dim 192
(V = 2K), negative eigenvalues (``linear_allow_neg_eigval``), 3 GDN layers + 1 full-attention layer;
2 key heads and 4 value heads, so the GQA head mapping is exercised too.

The checkpoint is written by hand rather than with ``save_pretrained``: transformers 5.19 saves
OLMo-hybrid in the original checkpoint naming by reversing its load-time conversion, and that
reversal (a) splits the fused conv weight into three *equal* parts (wrong when the key and value
dims differ) and (b) renames the norms to ``attention_layer_norm``/``feedforward_layer_norm``, which
vLLM 0.32's OLMo-hybrid loader does not know. We save the model's own parameter names, with the
fused conv split into ``q_conv1d``/``k_conv1d``/``v_conv1d`` at the right sizes: vLLM maps those
onto its fused conv (``OlmoHybridModel.hf_to_vllm_mapper``), and transformers' loader concatenates
them back (its conversion mapping).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from vllm_gdn_cpu.testing.tiny_models import INIT_GAIN, _is_saved, random_model


def tiny_olmo_hybrid_config(vocab_size: int, eos_token_id: int, pad_token_id: int, dtype: torch.dtype):
    from transformers import OlmoHybridConfig

    return OlmoHybridConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=96,
        linear_value_head_dim=192,
        linear_conv_kernel_dim=4,
        linear_allow_neg_eigval=True,
        max_position_embeddings=4096,
        initializer_range=0.02 * INIT_GAIN,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        dtype=dtype,
    )


def _checkpoint_tensors(model, config) -> dict[str, torch.Tensor]:
    key_dim = config.linear_num_key_heads * config.linear_key_head_dim
    value_dim = config.linear_num_value_heads * config.linear_value_head_dim
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("linear_attn.conv1d.weight"):
            base = name[: -len("conv1d.weight")]
            for part, piece in zip("qkv", tensor.split([key_dim, key_dim, value_dim])):
                tensors[f"{base}{part}_conv1d.weight"] = piece.contiguous()
        else:
            tensors[name] = tensor.contiguous()
    return tensors


def build_tiny_olmo_hybrid(directory: Union[str, Path], dtype: torch.dtype = torch.float32) -> Path:
    """Builds a tiny random OLMo-hybrid checkpoint plus tokenizer into ``directory`` (idempotent)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, OlmoHybridForCausalLM

    directory = Path(directory)
    if _is_saved(directory, "config.json") and _is_saved(directory, "model.safetensors"):
        return directory
    config, model = random_model(directory, tiny_olmo_hybrid_config, OlmoHybridForCausalLM, dtype)
    config.architectures = ["OlmoHybridForCausalLM"]  # else vLLM takes it for a pooling model
    config.save_pretrained(directory)
    GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id).save_pretrained(
        directory
    )
    save_file(_checkpoint_tensors(model, config), directory / "model.safetensors", metadata={"format": "pt"})
    return directory


__all__ = ["build_tiny_olmo_hybrid", "tiny_olmo_hybrid_config"]
