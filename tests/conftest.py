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


@pytest.fixture
def activation_log(monkeypatch, capfd):
    """Our layers' INFO lines (``vllm_gdn_cpu: CPU kernels for <Class> (...)``) of the engine a test
    starts; call the fixture's value after the engine ran to get them as text.

    In-process engines log from this process, where the line is logged once per process (the
    fixture forgets earlier ones) and where vLLM's log handlers may still point at the stream of an
    earlier test's capture: the lines are recorded at the call. Engines in their own processes are
    read from the captured file descriptors."""
    from vllm_gdn_cpu.layers import common

    monkeypatch.setattr(common, "_logged_classes", set())
    recorded: list[str] = []
    info = common.logger.info

    def record(msg, *args, **kwargs):
        recorded.append(str(msg) % args if args else str(msg))
        return info(msg, *args, **kwargs)

    monkeypatch.setattr(common.logger, "info", record)

    def text() -> str:
        captured = capfd.readouterr()
        return "\n".join([captured.out, captured.err, *recorded])

    return text
