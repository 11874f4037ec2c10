"""Kernel benchmarks: ours vs vLLM's built-in CPU ops vs a plain-torch reference, side by side.

    python -m vllm_gdn_cpu.tools.bench prefill [--models qwen3-next,...] [--workloads T512,...] [--json]
    python -m vllm_gdn_cpu.tools.bench prefill --heads 1,4,8 --workloads T8192 --scaling [--schedules auto,sequential]
    python -m vllm_gdn_cpu.tools.bench decode  [--batches 1,16,64] [--splits auto,heads] [--layers N] [--json]
    python -m vllm_gdn_cpu.tools.bench roofline                             (limits; per-core scaling ceiling)
    python -m vllm_gdn_cpu.tools.bench overhead [--state-dtype float32]   (fixed per-call cost, decode B=1)
    python -m vllm_gdn_cpu.tools.bench e2e [--batches 1,16] [--tp 2]        (inside vLLM: ours vs built-in)
    python -m vllm_gdn_cpu.tools.bench mamba2-layer [--layers 8]            (Mamba2 layer core inside vLLM, side by side)
    python -m vllm_gdn_cpu.tools.bench mamba2-prefill | mamba2-decode ...   (Mamba2 SSD: bench/mamba2.py)
    python -m vllm_gdn_cpu.tools.bench kda-prefill | kda-decode ...         (KDA / Kimi-Linear: bench/kda.py)
    python -m vllm_gdn_cpu.tools.bench mamba1-prefill | mamba1-decode ...   (Mamba-1 selective scan: bench/mamba1.py)
    python -m vllm_gdn_cpu.tools.bench gemv [--shapes NxK,...] [--ms 1,4,16]  (projections: bench/gemv.py)
    python -m vllm_gdn_cpu.tools.bench mtp [--spec-tokens 0,1,2]            (MTP speculation inside vLLM)

Every figure comes from the same process and the same run: rates of each implementation, their
ratios, and percentages of limits measured here (bf16/fp32 GEMM throughput of a large torch
matmul; in-place read+write stream bandwidth). Needs only torch; the vLLM columns appear when vLLM
is importable.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from vllm_gdn_cpu import ops
from vllm_gdn_cpu.tools.bench import (
    e2e,
    gdn,
    gemv,
    kda,
    mamba1,
    mamba2,
    mamba2_layer,
    mtp,
    overhead,
    roofline,
)
from vllm_gdn_cpu.tools.bench.harness import common_parser

# The one registry of subcommands: each module adds its own (add_parsers(sub, common)), each
# subcommand's parser naming the function that runs it (set_defaults(run=...)).
BENCH_MODULES = (gdn, roofline, overhead, e2e, mamba2_layer, mamba2, kda, mamba1, gemv, mtp)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vllm_gdn_cpu.tools.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    common = common_parser()
    for module in BENCH_MODULES:
        module.add_parsers(sub, common)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = {"runtime": ops.runtime_info(), "torch": torch.__version__}
    if not args.json:
        print(f"# vllm_gdn_cpu bench {args.mode}: {info}", flush=True)
    rows = args.run(args)
    if args.json:
        json.dump({"mode": args.mode, **info, "rows": rows}, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
