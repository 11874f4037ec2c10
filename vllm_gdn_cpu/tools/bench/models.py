"""The models the in-vLLM benches serve (``e2e``, ``mamba2_layer``): configs written locally and
served with vLLM's dummy weights, and the weight fix-ups those need. No bench module is imported here."""

from __future__ import annotations

from pathlib import Path


def write_config(directory: Path, num_layers: int) -> Path:
    from transformers import Qwen3NextConfig

    config = Qwen3NextConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=num_layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, full_attention_interval=4,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, shared_expert_intermediate_size=256,
        mlp_only_layers=list(range(1, num_layers)), max_position_embeddings=8192, dtype="bfloat16",
    )
    config.architectures = ["Qwen3NextForCausalLM"]  # a bare config names no model class otherwise
    config.save_pretrained(directory)
    return directory


def write_granite_4h_config(directory: Path, num_layers: int) -> Path:
    """A Granite-4.0-H-shaped Mamba2 hybrid (GraniteMoeHybrid without experts): attention every 8th layer."""
    from transformers import GraniteMoeHybridConfig

    config = GraniteMoeHybridConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=num_layers,
        layer_types=["attention" if i % 8 == 7 else "mamba" for i in range(num_layers)],
        num_attention_heads=8, num_key_value_heads=2, position_embedding_type="nope",
        num_local_experts=0, shared_intermediate_size=2816, mamba_n_heads=32, mamba_d_head=64,
        mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256,
        max_position_embeddings=8192, dtype="bfloat16",
    )
    config.architectures = ["GraniteMoeHybridForCausalLM"]
    config.save_pretrained(directory)
    return directory


def realistic_decays(model) -> int:
    """vLLM's dummy weights leave the decay parameters near 0: Mamba2's A (= -exp(A_log), applied only
    when loading real checkpoints) uniform around 0, half of it positive (growing states; our ops
    refuse A > 0), and every GDN head alike (A_log = dt_bias = 0). Spreads them over the heads as
    trained checkpoints have them, for both backends alike (the kernel benches' --decays realistic):
    Mamba2 A = -1..-16 with dt_bias -4..-1; GDN A_log -2..1 with dt_bias -1..1. Returns the number of
    layers set."""
    import torch

    count = 0
    for module in model.modules():
        A, A_log, dt_bias = (getattr(module, name, None) for name in ("A", "A_log", "dt_bias"))
        if not isinstance(dt_bias, torch.nn.Parameter):
            continue
        with torch.no_grad():
            if isinstance(A, torch.nn.Parameter):  # Mamba2 (MambaMixer2)
                A.copy_(-torch.linspace(1.0, 16.0, A.numel()))
                dt_bias.copy_(torch.linspace(-4.0, -1.0, dt_bias.numel()))
                count += 1
            elif isinstance(A_log, torch.nn.Parameter):  # GDN
                A_log.copy_(torch.linspace(-2.0, 1.0, A_log.numel()))
                dt_bias.copy_(torch.linspace(-1.0, 1.0, dt_bias.numel()))
                count += 1
    return count
