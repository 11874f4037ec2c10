"""``python -m vllm_gdn_cpu.tools.bench roofline``: the limits the other benches' percentages are of,
measured alone: torch's bf16/fp32 GEMM peaks, the in-place stream bandwidth, and the per-core rate
of our GEMM engine alone and with every core busy (the scaling ceiling of a compute-bound kernel)."""

from __future__ import annotations

import torch

from vllm_gdn_cpu.tools.bench.harness import core_scaling, gemm_peaks, print_row, stream_gbps


def bench_roofline(args) -> list[dict]:
    threads = torch.get_num_threads()
    rows = [{**gemm_peaks(), "stream_gbps": stream_gbps(), "threads": threads, **core_scaling(threads)}]
    print_row(rows[0], args)
    return rows


def add_parsers(sub, common) -> None:
    r = sub.add_parser("roofline", parents=[common],
                       help="measured GEMM peaks, stream bandwidth, per-core GEMM rate alone and with all cores busy")
    r.set_defaults(run=bench_roofline)
