"""Tiny random Mamba2-family checkpoints, built locally (no network) for tests and benchmarks.

Four models whose mamba layers vLLM builds as ``MambaMixer2`` (the layer our plugin replaces):

* ``mamba2``: pure Mamba2 (``Mamba2ForCausalLM``). ``n_groups = 1``: HF's gated RMSNorm
  normalises over the whole inner dim while vLLM normalises per group, so with more groups HF is
  no reference (see /work/shared/notes/mamba-family-facts.md);
* ``granite``: GraniteMoeHybrid (Granite-4.0-H): mamba layers + one attention layer (no positional
  embedding, as the real models), MoE MLPs;
* ``nemotron_h``: NemotronH (pattern mamba / attention / MLP layers), ``n_groups = 2``: HF's
  NemotronH normalises per group like vLLM, so it is the reference for grouped B/C;
* ``falcon_h1``: FalconH1 (attention and mamba in parallel in every layer; ``mamba_d_ssm`` set).

Random init (HF's dt_bias and A_log) gives per-token decays of nearly 1 in every head, so the
state would hardly matter; ``_spread_decays`` draws A = exp(A_log) and dt = softplus(dt_bias) over
wide ranges, so per-token decays exp(-A dt) go from ~1 down to ~0.1 and a wrong or lost state
changes the greedy tokens. Chunk sizes are small (32) so that HF's chunked torch path also crosses
chunk boundaries. The weights are drawn in float32 with a fixed seed and cast, so checkpoints of
different dtypes hold the same model up to rounding. No tokenizer: tests run tokenizer-free
(``skip_tokenizer_init=True`` and token ids).

CLI: ``python -m vllm_gdn_cpu.testing.tiny_mamba2 KIND DIR [--dtype bfloat16]``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Union

import torch

from vllm_gdn_cpu.testing.checkpoint import builder_main, save_once, seeded_model

SEED = 1234
VOCAB_SIZE = 512
CHUNK_SIZE = 32
# Gain on HF's init std, as tiny_models does: spread logits so greedy argmax has clear winners.
INIT_GAIN = 4.0
EOS, PAD, BOS = 2, 0, 1


def mamba2_config(dtype: torch.dtype):
    from transformers import Mamba2Config

    return Mamba2Config(
        vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=3, num_heads=8, head_dim=32,
        expand=2, state_size=16, n_groups=1, conv_kernel=4, chunk_size=CHUNK_SIZE,
        use_bias=False, use_conv_bias=True, initializer_range=0.1, tie_word_embeddings=False,
        eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS, dtype=dtype,
        architectures=["Mamba2ForCausalLM"],
    )


def granite_config(dtype: torch.dtype):
    from transformers import GraniteMoeHybridConfig

    return GraniteMoeHybridConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        layer_types=["mamba", "attention", "mamba"], num_attention_heads=4, num_key_value_heads=2,
        position_embedding_type="nope", num_local_experts=4, num_experts_per_tok=2,
        shared_intermediate_size=128, mamba_n_heads=8, mamba_n_groups=1, mamba_d_state=16,
        mamba_d_head=32, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=CHUNK_SIZE,
        max_position_embeddings=4096, initializer_range=0.02 * INIT_GAIN,
        tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS,
        dtype=dtype, architectures=["GraniteMoeHybridForCausalLM"],
    )


def nemotron_h_config(dtype: torch.dtype):
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, layers_block_type=["mamba", "attention", "mlp", "mamba"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=256,
        mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=16, n_groups=2, conv_kernel=4,
        expand=2, chunk_size=CHUNK_SIZE, max_position_embeddings=4096,
        initializer_range=0.02 * INIT_GAIN, tie_word_embeddings=False, eos_token_id=EOS,
        pad_token_id=PAD, bos_token_id=BOS, dtype=dtype, architectures=["NemotronHForCausalLM"],
    )


def falcon_h1_config(dtype: torch.dtype):
    from transformers import FalconH1Config

    return FalconH1Config(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, mamba_d_ssm=256, mamba_n_heads=8,
        mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
        mamba_chunk_size=CHUNK_SIZE, max_position_embeddings=4096,
        initializer_range=0.02 * INIT_GAIN, tie_word_embeddings=False, eos_token_id=EOS,
        pad_token_id=PAD, bos_token_id=BOS, dtype=dtype, architectures=["FalconH1ForCausalLM"],
    )


# kind -> config builder
CONFIGS: dict[str, Callable] = {
    "mamba2": mamba2_config,
    "granite": granite_config,
    "nemotron_h": nemotron_h_config,
    "falcon_h1": falcon_h1_config,
}


def _spread_decays(model) -> None:
    """A = exp(A_log) log-uniform in [0.05, 4] and dt = softplus(dt_bias) log-uniform in
    [0.005, 0.5] per head (before the input-dependent part of dt), so exp(-A dt) spans ~1 to ~0.1."""
    generator = torch.Generator().manual_seed(SEED)
    for module in model.modules():
        if not (hasattr(module, "A_log") and hasattr(module, "dt_bias")):
            continue
        heads = module.A_log.shape
        a = torch.empty(heads).uniform_(math.log(0.05), math.log(4.0), generator=generator).exp()
        dt = torch.empty(heads).uniform_(math.log(0.005), math.log(0.5), generator=generator).exp()
        with torch.no_grad():
            module.A_log.copy_(a.log())
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


def random_model(kind: str, dtype: torch.dtype = torch.float32):
    """(config, model): a seeded random model of ``kind``, drawn in float32, cast to ``dtype``."""
    config = CONFIGS[kind](dtype)
    return config, seeded_model(config, SEED, _spread_decays, dtype)


def build_tiny_mamba2(kind: str, directory: Union[str, Path], dtype: torch.dtype = torch.float32) -> Path:
    """Builds a tiny random ``kind`` checkpoint (one of ``CONFIGS``) into ``directory`` (idempotent)."""
    return save_once(directory, lambda: random_model(kind, dtype)[1], EOS, PAD, BOS)


def main(argv=None) -> None:
    builder_main(__doc__.splitlines()[0], CONFIGS, build_tiny_mamba2, argv)


if __name__ == "__main__":
    main()


__all__ = ["CONFIGS", "build_tiny_mamba2", "random_model"]
