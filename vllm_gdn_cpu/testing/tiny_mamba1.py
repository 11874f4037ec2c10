"""Tiny random Mamba-1-family checkpoints, built locally (no network) for tests and benchmarks.

Three models whose mamba layers vLLM builds as ``MambaMixer`` (the layer our plugin replaces;
vLLM 0.32 has no CPU path for it):

* ``mamba``: pure Mamba-1 (``MambaForCausalLM``);
* ``falcon_mamba``: FalconMamba (``FalconMambaForCausalLM``, served by vLLM's mamba.py): weightless
  RMS norms on dt, B and C inside the mixer;
* ``jamba``: Jamba: mamba layers (weighted RMS norms on dt, B, C), one attention layer, MoE MLPs.

HF's init draws A_log = log(1..N) for every channel and dt_proj's bias for dt in [0.001, 0.1], so
per-token decays exp(-A dt) sit near 1 for most (channel, state) pairs; ``_spread_decays`` draws
A = exp(A_log) log-uniform in [0.05, 4] per (channel, state) and dt = softplus(dt bias)
log-uniform in [0.005, 0.5] per channel, so the decays go from ~1 down to ~0.1 and a wrong or lost
state changes the greedy tokens. The weights are drawn in float32 with a fixed seed and cast, so
checkpoints of different dtypes hold the same model up to rounding. No tokenizer: tests run
tokenizer-free (``skip_tokenizer_init=True`` and token ids).

CLI: ``python -m vllm_gdn_cpu.testing.tiny_mamba1 KIND DIR [--dtype bfloat16]``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Union

import torch

from vllm_gdn_cpu.testing.checkpoint import builder_main, save_once, seeded_model

SEED = 1234
VOCAB_SIZE = 512
EOS, PAD, BOS = 2, 0, 1


def mamba_config(dtype: torch.dtype):
    from transformers import MambaConfig

    return MambaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, state_size=16, num_hidden_layers=3, expand=2,
        conv_kernel=4, time_step_rank=8, use_bias=False, use_conv_bias=True,
        tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS,
        dtype=dtype, architectures=["MambaForCausalLM"],
    )


def falcon_mamba_config(dtype: torch.dtype):
    from transformers import FalconMambaConfig

    return FalconMambaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, state_size=16, num_hidden_layers=3, expand=2,
        conv_kernel=4, time_step_rank=8, use_bias=False, use_conv_bias=True, mixer_rms_eps=1e-6,
        tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS,
        dtype=dtype, architectures=["FalconMambaForCausalLM"],
    )


def jamba_config(dtype: torch.dtype):
    from transformers import JambaConfig

    # Layers: mamba (dense MLP), attention (MoE), mamba (dense MLP).
    return JambaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        expert_layer_period=3, expert_layer_offset=1, attn_layer_period=3, attn_layer_offset=1,
        use_mamba_kernels=False, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
        mamba_conv_bias=True, mamba_proj_bias=False, max_position_embeddings=4096,
        initializer_range=0.08, tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD,
        bos_token_id=BOS, dtype=dtype, architectures=["JambaForCausalLM"],
    )


# kind -> config builder
CONFIGS: dict[str, Callable] = {
    "mamba": mamba_config,
    "falcon_mamba": falcon_mamba_config,
    "jamba": jamba_config,
}


def _spread_decays(model) -> None:
    """A = exp(A_log) log-uniform in [0.05, 4] per (channel, state), dt = softplus(dt_proj.bias)
    log-uniform in [0.005, 0.5] per channel (before dt's input-dependent part)."""
    generator = torch.Generator().manual_seed(SEED)
    for module in model.modules():
        if not (hasattr(module, "A_log") and hasattr(module, "dt_proj")):
            continue
        a = torch.empty(module.A_log.shape).uniform_(math.log(0.05), math.log(4.0), generator=generator).exp()
        dt = torch.empty(module.dt_proj.bias.shape).uniform_(
            math.log(0.005), math.log(0.5), generator=generator).exp()
        with torch.no_grad():
            module.A_log.copy_(a.log())
            module.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


def random_model(kind: str, dtype: torch.dtype = torch.float32):
    """(config, model): a seeded random model of ``kind``, drawn in float32, cast to ``dtype``."""
    config = CONFIGS[kind](dtype)
    return config, seeded_model(config, SEED, _spread_decays, dtype)


def build_tiny_mamba1(kind: str, directory: Union[str, Path], dtype: torch.dtype = torch.float32) -> Path:
    """Builds a tiny random ``kind`` checkpoint (one of ``CONFIGS``) into ``directory`` (idempotent)."""
    return save_once(directory, lambda: random_model(kind, dtype)[1], EOS, PAD, BOS)


def main(argv=None) -> None:
    builder_main(__doc__.splitlines()[0], CONFIGS, build_tiny_mamba1, argv)


if __name__ == "__main__":
    main()


__all__ = ["CONFIGS", "VOCAB_SIZE", "build_tiny_mamba1", "random_model"]
