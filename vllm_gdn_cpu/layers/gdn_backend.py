"""The ``GDN_CPU`` mamba-type attention backend: vLLM's GDN metadata, minus what our kernels ignore.

The metadata (``GDNAttentionMetadata``: decode/prefill split, state indices, query start offsets,
has_initial_state) is exactly what vLLM's own GDN backend builds, so the builder is reused as is,
except for the FLA chunk tables (chunk_indices / chunk_offsets): those only feed the Triton
prefill kernels, and our prefill kernel derives its chunks from cu_seqlens itself, so building
them every step would be wasted host work.
"""

from __future__ import annotations

import torch

from vllm.v1.attention.backends.gdn_attn import GDNAttentionBackend, GDNAttentionMetadataBuilder

BACKEND_NAME = "GDN_CPU"


class GDNCPUAttentionMetadataBuilder(GDNAttentionMetadataBuilder):
    def _build_chunk_metadata(
        self,
        prefill_query_start_loc: torch.Tensor,
        prefill_query_start_loc_cpu: torch.Tensor,
        device: torch.device,
    ) -> tuple[None, None]:
        return None, None


class GDNCPUAttentionBackend(GDNAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_builder_cls() -> type[GDNCPUAttentionMetadataBuilder]:
        return GDNCPUAttentionMetadataBuilder
