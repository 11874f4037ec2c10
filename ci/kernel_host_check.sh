#!/bin/bash
# Kernel checks on a machine with torch but without vLLM (our AMX test host): builds the extension
# against that torch, runs every torch-only test on the path the CPU selects (and, with AMX, the
# prefill tests forced onto every other GEMM path too), then the kernel benchmarks. Usage:
#   bash ci/kernel_host_check.sh [tests|bench|all]    (default: all)
# Error-path tests are left out: on torch 2.11 CUDA builds raising an argument error whose message
# formats a number crashes (README, "Supported").
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
build=${BUILD_DIR:-/tmp/vllm_gdn_cpu_build}
python=${PYTHON:-python3}

cmake -S . -B "$build" -G Ninja -DPython_EXECUTABLE="$(command -v "$python")" >/dev/null
ninja -C "$build" >/dev/null
cp "$build"/_C*.so vllm_gdn_cpu/
export PYTHONPATH=$PWD
"$python" -m vllm_gdn_cpu.tools.info

pytest_args=(-q --noconftest -p no:cacheprovider -m "not vllm and not error_path")
export GDN_PROPERTY_SELECT="not error_path"
if [[ $what == tests || $what == all ]]; then
  "$python" -m pytest "${pytest_args[@]}" tests/
fi
if [[ $what == bench || $what == all ]]; then
  threads=$(nproc)
  for t in 1 $threads; do
    "$python" -m vllm_gdn_cpu.tools.bench decode --threads "$t" --no-vllm --no-ref --batches 1,16,64 \
      --state-dtypes float32,bfloat16 --dtype bfloat16
  done
  # Prefill on every fast GEMM path this CPU has, timed side by side (interleaved) in one process.
  gemms=$("$python" -c 'from vllm_gdn_cpu import ops
have = ops.runtime_info()["available_gemms"]
print(",".join(p for p in ("amx", "avx512", "avx512_bf16", "avx2") if p in have))')
  for t in 1 $threads; do
    "$python" -m vllm_gdn_cpu.tools.bench prefill --threads "$t" --no-vllm --no-ref --models qwen3-next \
      --workloads T2048,T8192 --gemms "$gemms"
  done
  # Mamba2 (SSD): decode over cold states, prefill on the path the CPU selects and on each other fast one.
  for t in 1 $threads; do
    "$python" -m vllm_gdn_cpu.tools.bench mamba2-decode --threads "$t" --no-vllm --no-ref --batches 1,16 \
      --state-dtypes float32,bfloat16
    for g in ${gemms//,/ }; do
      VLLM_GDN_CPU_GEMM=$g "$python" -m vllm_gdn_cpu.tools.bench mamba2-prefill --threads "$t" --no-vllm --no-ref \
        --workloads T2048,8x256
    done
  done
fi
