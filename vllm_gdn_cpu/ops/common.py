"""The extension, the run-time report and the benchmarks' machine probes."""

from __future__ import annotations

import torch

from vllm_gdn_cpu import _C  # noqa: F401  (loads the extension, registers torch.ops.vllm_gdn_cpu)

_ops = torch.ops.vllm_gdn_cpu

ISA_ENV = "VLLM_GDN_CPU_ISA"
GEMM_ENV = "VLLM_GDN_CPU_GEMM"
# Caps what the CPU is taken to support (tests emulating an older CPU), see kernels/common/runtime.h.
MAX_ISA_ENV = "VLLM_GDN_CPU_MAX_ISA"


def runtime_info() -> dict:
    """What the kernels run on now (honouring VLLM_GDN_CPU_ISA / VLLM_GDN_CPU_GEMM).

    isa: vector ISA of all kernels; gemm: GEMM engine of the chunked prefill ("-fp32" when it does
    not use bf16 products); available_*: what this build and CPU can run, best first.
    """
    fields = dict(item.split("=", 1) for item in _ops.runtime_info().split(";"))
    return {
        "isa": fields["isa"],
        "gemm": fields["gemm"],
        "available_isas": fields["available"].split(","),
        "available_gemms": fields["gemms"].split(","),
        "threads": int(fields["threads"]),
    }


# Fake (meta) implementations: shapes and dtypes only, for torch.compile / FakeTensor tracing.
@torch.library.register_fake("vllm_gdn_cpu::stream_scale")
def _stream_scale_fake(x, factor):
    return None


@torch.library.register_fake("vllm_gdn_cpu::gemm_probe")
def _gemm_probe_fake(bf16, seconds):
    return torch.empty(torch.get_num_threads(), dtype=torch.float64)


def stream_scale_(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x *= factor in place (float32, contiguous), streamed like the decode kernel streams states.
    Not a GDN op: the benchmarks' probe of in-place memory bandwidth. Returns x."""
    _ops.stream_scale(x, float(factor))
    return x


def gemm_probe(bf16: bool = True, seconds: float = 0.5) -> torch.Tensor:
    """GFLOP/s of each of torch's threads running the prefill's GEMM engine (the active
    VLLM_GDN_CPU_GEMM path, in bf16 mode where it has one when bf16) on its own L2-resident
    chunk-sized operands, all threads at once, for `seconds`. Not a GDN op: the benchmarks' probe of
    per-core compute alone (one thread) and with every core busy. Returns float64 [threads]."""
    return _ops.gemm_probe(bool(bf16), float(seconds))
