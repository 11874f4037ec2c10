"""gemm_probe, the benchmarks' per-core compute probe: one rate per thread, from every thread (a
thread that did no work would report zero and fake a scaling ceiling), on every GEMM path this
machine runs, in bf16 and fp32 mode; a bad duration is refused."""

import math

import pytest
import torch

from gdn_cases import forced_gemm, gemms, torch_threads
from vllm_gdn_cpu import ops


@pytest.mark.parametrize("gemm", gemms())
@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_thread_reports_a_rate(gemm, bf16, threads):
    with torch_threads(threads), forced_gemm(gemm):
        rates = ops.gemm_probe(bf16, 0.02)
    assert rates.dtype == torch.float64 and rates.shape == (threads,)
    # Above 0.01 GFLOP/s is any real GEMM; below 100 TFLOP/s per core is any real CPU.
    assert all(0.01 < r < 1e5 and math.isfinite(r) for r in rates.tolist()), rates


@pytest.mark.error_path
@pytest.mark.parametrize("seconds", [0.0, -1.0, 61.0])
def test_rejects_bad_duration(seconds):
    with pytest.raises(ValueError, match="argument 'seconds' must be in"):
        ops.gemm_probe(True, seconds)
