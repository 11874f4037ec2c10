"""Prints what the (emulated) aarch64 CPU offers, as the kernel sees it: the HWCAP bits the Linux
ABI reports (read from /proc/self/auxv, which QEMU user mode fills in for the -cpu model), the SVE
vector length (prctl), torch's CPU capability and our extension's ISA/GEMM paths. With --expect
sve-bf16 or --expect neon, exits 1 unless the CPU is what the check meant to emulate."""

import argparse
import ctypes
import struct
import sys

AT_HWCAP, AT_HWCAP2 = 16, 26
HWCAP = {"asimd": 1 << 1, "asimdhp": 1 << 10, "asimddp": 1 << 20, "sve": 1 << 22}
HWCAP2 = {"sve2": 1 << 1, "svebf16": 1 << 12, "i8mm": 1 << 13, "bf16": 1 << 14}
PR_SVE_GET_VL = 51


def auxv() -> dict[int, int]:
    data = open("/proc/self/auxv", "rb").read()
    pairs = struct.iter_unpack("<QQ", data)
    return {k: v for k, v in pairs if k != 0}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expect", choices=["sve-bf16", "neon"])
    args = parser.parse_args()

    import platform

    aux = auxv()
    hw, hw2 = aux.get(AT_HWCAP, 0), aux.get(AT_HWCAP2, 0)
    feats = [n for n, b in HWCAP.items() if hw & b] + [n for n, b in HWCAP2.items() if hw2 & b]
    sve_bits = 0
    if hw & HWCAP["sve"]:
        libc = ctypes.CDLL(None, use_errno=True)
        vl = libc.prctl(PR_SVE_GET_VL, 0, 0, 0, 0)
        sve_bits = (vl & 0xFFFF) * 8 if vl >= 0 else 0

    import torch

    from vllm_gdn_cpu import ops

    info = ops.runtime_info()
    print(f"  machine={platform.machine()} features: {' '.join(feats)}"
          + (f" (SVE vector length {sve_bits} bits)" if sve_bits else ""))
    print(f"  torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}; "
          f"vllm_gdn_cpu isas={info['available_isas']} gemms={info['available_gemms']} threads={info['threads']}")
    if args.expect == "sve-bf16" and not {"sve", "bf16", "svebf16"} <= set(feats):
        print("  ERROR: expected an SVE + bf16 CPU", file=sys.stderr)
        return 1
    if args.expect == "neon" and ("asimd" not in feats or {"sve", "bf16"} & set(feats)):
        print("  ERROR: expected a plain-NEON CPU (no SVE, no bf16)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
