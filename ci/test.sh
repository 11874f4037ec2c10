#!/usr/bin/env bash
# Sets up the environment (idempotent) and runs the whole test suite. Extra args go to pytest (and
# then only that pytest run happens).
#
# Without arguments, the kernel tests (everything not marked slow) run a second time as an
# AVX2-only x86 CPU (AMD Zen 2/3, older Xeons: no AVX-512, no native bf16) would run them, emulated
# on this CPU: our kernels capped at AVX2 (VLLM_GDN_CPU_MAX_ISA), torch's kernels, oneDNN and MKL
# likewise. On an AVX2-only machine that pass repeats the first one's configuration.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/ci/setup.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
if [ "$#" -gt 0 ]; then
  exec "$PY" -m pytest -ra "$@" tests
fi
"$PY" -m pytest -ra tests
echo "[test] kernel tests again as an AVX2-only CPU (VLLM_GDN_CPU_MAX_ISA=avx2, ATEN_CPU_CAPABILITY=avx2," \
     "ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2)"
VLLM_GDN_CPU_MAX_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
  "$PY" -m pytest -ra -m "not slow" tests
