#!/usr/bin/env bash
# Sets up the environment (ci/setup.sh), then runs the demo: vLLM's OpenAI server on 127.0.0.1 with
# VLLM_ATTENTION_BACKEND=GDN_CPU serving a locally built tiny Qwen3-Next, one completion request,
# reply + tokens/s + the backend's activation line, server stopped. Extra arguments go to the demo
# (python -m vllm_gdn_cpu.tools.demo --help). Bounded: the demo's own waits, plus a hard limit here.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_GDN_CPU_VENV:-$ROOT/.venv}"
LIMIT_S="${VLLM_GDN_CPU_DEMO_LIMIT_S:-1200}"

bash "$ROOT/ci/setup.sh"
# --foreground keeps Ctrl-C working; on the limit the demo gets SIGTERM and stops its server.
exec timeout --foreground --kill-after=30 "$LIMIT_S" "$VENV/bin/python" -m vllm_gdn_cpu.tools.demo "$@"
