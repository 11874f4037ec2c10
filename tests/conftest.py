"""Fixtures shared by the vLLM integration tests (plugin, end-to-end, serving)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Never reach out to the Hugging Face hub: every model and tokenizer here is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


@pytest.fixture(scope="session")
def tiny_qwen3_next_dir(tmp_path_factory) -> Path:
    """A tiny random float32 Qwen3-Next checkpoint plus tokenizer (built once per session)."""
    pytest.importorskip("transformers", reason="building the tiny checkpoint needs transformers")
    from vllm_gdn_cpu.testing.tiny_models import build_tiny_qwen3_next

    return build_tiny_qwen3_next(tmp_path_factory.mktemp("tiny-qwen3-next"), dtype=torch.float32)
