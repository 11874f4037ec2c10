"""Tiny random Qwen3.5 text checkpoints (``Qwen3_5ForCausalLM``), built locally (no network).

Qwen3.5's text model in miniature: 4 decoder layers, GDN (linear attention) in layers 1-3 and gated
full attention (partial rotary) in layer 4, dense MLPs; Qwen3.5's layout of the GDN projections
(separate ``in_proj_qkv``/``in_proj_z``/``in_proj_b``/``in_proj_a``, which vLLM stacks flat) and 2 key
heads / 4 value heads of dimension 64, as in Qwen3.5's grouped value heads. Saved by transformers'
``save_pretrained`` (``model_type`` "qwen3_5_text", as a text-only Qwen3.5 checkpoint is), with the
tokenizer of ``tiny_models``; GDN decays moderated as for the tiny Qwen3-Next.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from vllm_gdn_cpu.testing.tiny_models import INIT_GAIN, _is_saved, random_model


def tiny_qwen3_5_config(vocab_size: int, eos_token_id: int, pad_token_id: int, dtype: torch.dtype):
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        max_position_embeddings=4096,
        initializer_range=0.02 * INIT_GAIN,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype=dtype,
    )


def build_tiny_qwen3_5(directory: Union[str, Path], dtype: torch.dtype = torch.float32) -> Path:
    """Builds a tiny random Qwen3.5 text checkpoint plus tokenizer into ``directory`` (idempotent)."""
    from transformers import Qwen3_5ForCausalLM

    directory = Path(directory)
    if _is_saved(directory, "config.json") and _is_saved(directory, "model.safetensors"):
        return directory
    _, model = random_model(directory, tiny_qwen3_5_config, Qwen3_5ForCausalLM, dtype)
    model.save_pretrained(directory)
    return directory


__all__ = ["build_tiny_qwen3_5", "tiny_qwen3_5_config"]
