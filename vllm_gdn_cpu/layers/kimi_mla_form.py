"""Which form Kimi-Linear's MLA layers take on CPU (``vllm_gdn_cpu.layers.kimi_linear``), decided
at config time, before vLLM sizes the KV cache: vLLM's per-architecture config hook
(``MODELS_CONFIG_MAP``), registered by ``vllm_gdn_cpu.plugin``. Light on imports: the plugin loads
it in every vLLM process."""

from __future__ import annotations

import os

from vllm_gdn_cpu import is_requested


# Kimi-Linear's MLA layers run in one of two forms (vllm_gdn_cpu.layers.kimi_linear): "latent" (vLLM's
# MLA layer and CPU MLA backend: AMX_MLA, bf16 and latent head 576 only) or "decompressed" (vLLM's
# standard Attention layer on CPU_ATTN: every dtype and ISA, prefix caching, chunked prefill).
KIMI_MLA_ENV = "VLLM_GDN_CPU_KIMI_MLA"  # auto (default) | latent | decompressed
AMX_MLA_LATENT_HEAD = 576


def kimi_mla_form(model_config) -> str:
    """"latent" where vLLM's AMX_MLA backend serves it (AMX tiles, bfloat16, kv_lora_rank +
    qk_rope_head_dim = 576: its only kernels), else "decompressed"; VLLM_GDN_CPU_KIMI_MLA forces one."""
    import torch

    forced = os.environ.get(KIMI_MLA_ENV, "auto").strip().lower()
    if forced not in ("auto", "latent", "decompressed"):
        raise ValueError(f"{KIMI_MLA_ENV}={forced!r}: expected auto, latent or decompressed")
    if forced != "auto":
        return forced
    hf = model_config.hf_text_config
    latent_ok = (torch.cpu._is_amx_tile_supported() and model_config.dtype == torch.bfloat16
                 and hf.kv_lora_rank + hf.qk_rope_head_dim == AMX_MLA_LATENT_HEAD)
    return "latent" if latent_ok else "decompressed"


def decompressed_head_size(qk_head_dim: int, v_head_dim: int) -> int:
    """The decompressed form's attention head size: q/k and v share one head size in vLLM's CPU
    attention KV cache ([blocks, kv heads, block, 2 * head size]), so the smaller side is padded with
    zeros up to the larger one, then up to the next head size CPU_ATTN supports."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    need = max(qk_head_dim, v_head_dim)
    sizes = [n for n in CPUAttentionBackend.get_supported_head_sizes() if n >= need]
    if not sizes:
        raise NotImplementedError(f"vllm_gdn_cpu: Kimi MLA head size {need} exceeds vLLM's CPU attention sizes")
    return min(sizes)


class KimiLinearMLAForm:
    """vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``, run in ``VllmConfig.__post_init__``
    before the hybrid page alignment and the CPU platform's MLA settings). For the decompressed
    form, the model's architecture config says what its attention layers are: not DeepSeek-MLA
    (so ``use_mla`` is False: no CPU MLA backend, prefix caching and chunked prefill stay on), one
    KV head per query head, head size as the layer's (qk head padded to v and to a CPU_ATTN size)."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        import dataclasses

        model_config = vllm_config.model_config
        # The hook stays in vLLM's process-wide table once registered: it acts only under GDN_CPU.
        if not is_requested() or model_config is None or kimi_mla_form(model_config) != "decompressed":
            return
        hf = model_config.hf_text_config
        model_config.model_arch_config = dataclasses.replace(
            model_config.model_arch_config, is_deepseek_mla=False,
            head_size=decompressed_head_size(hf.qk_nope_head_dim + hf.qk_rope_head_dim, hf.v_head_dim),
            total_num_kv_heads=hf.num_attention_heads,
        )

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return
