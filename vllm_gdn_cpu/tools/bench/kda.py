"""KDA (Kimi Delta Attention) kernel benchmarks: ours vs the plain-torch reference, side by side.
(vLLM has no CPU KDA op to compare with: its KimiGatedDeltaNetAttention runs Triton kernels only.)

    python -m vllm_gdn_cpu.tools.bench kda-prefill [--models kimi-linear,...] [--workloads T2048,8x256] [--cpu-time]
    python -m vllm_gdn_cpu.tools.bench kda-decode  [--models ...] [--batches 1,16] [--state-dtypes ...] [--cpu-time]

Prefill: kda_gate + chunk_kda per layer call is not what is timed: chunk_kda alone (g, beta given),
against the float64-capable token-by-token reference run in fp32. GFLOP/s counts the chunked
algorithm's products (q k^T and k k^T with their decays, Tm v, Tm k, [w; q] S, Aqk v_new, the state
update; triangles as half; the per-channel exps of the diagonal blocks are not counted) and each row's
% is of the GEMM peak of the dtype its GEMM path multiplies in (harness.add_roofline).
Decode: fused_recurrent_kda (gate, l2norm and recurrence in one call) over ``layers`` state pools
stepped in turn (cold states); GB/s counts the state read and written once per step, % of the
in-place stream (harness.stream_gbps).
With ``--cpu-time`` each row also gets one-thread figures by CPU time (ours, and the limit measured
the same way: torch's matmul in the path's product dtype / stream_scale_ over as many bytes), which a
machine shared with other work distorts far less than wall time on all threads.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from vllm_gdn_cpu import ops, reference
from vllm_gdn_cpu.tools.bench.harness import (
    add_decay_ratios,
    add_state_family_parsers,
    add_roofline,
    best_cpu_time_1t,
    best_time,
    cold_state_pools,
    cpu_time_cold_decode,
    decay_columns,
    decay_spread,
    gemm_peaks,
    matmul_peak_1t,
    path_uses_bf16_products,
    print_decay_ratios,
    print_roofline,
    print_row,
    random_states,
    stream_gbps,
    time_cold_decode,
)

CHUNK = 64


@dataclass(frozen=True)
class KdaShape:
    name: str
    H: int
    K: int
    V: int


MODELS = {
    "kimi-linear": KdaShape("kimi-linear", 32, 128, 128),          # Kimi-Linear-48B-A3B, one rank
    "kimi-linear-tp4": KdaShape("kimi-linear-tp4", 8, 128, 128),   # its shard on 4 tensor-parallel ranks
}

WORKLOADS = {"T512": [512], "T2048": [2048], "8x256": [256] * 8, "16x128": [128] * 16}


def prefill_flops(s: KdaShape, seqlens: list[int]) -> float:
    macs = 0.0
    for L in seqlens:
        for c0 in range(0, L, CHUNK):
            n = min(CHUNK, L - c0)
            tri = n * (n + 1) / 2
            macs += 3 * tri * s.K + 2 * tri * s.V + 3 * n * s.K * s.V
    return 2 * s.H * macs


def decay_params(H: int, K: int, decays: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A_log [H] and dt_bias [H*K] (fp32) for a --decays value. Realistic: A_log = linspace(-2, 1) over
    the heads and, in every head, dt_bias = linspace(-3, 1) over its K channels, which with f ~ N(0, 1)
    give per-token, per-channel decays exp(A_log) softplus(f + dt_bias) of about 0.01 to 5 nats;
    strong: every head and channel at A_log = dt_bias = 1; benign: A_log -4..-3, dt_bias -2..-1
    (about 0.01 nats)."""
    A_log = decay_spread(decays, H, realistic=(-2.0, 1.0), benign=(-4.0, -3.0))
    return A_log, decay_spread(decays, K, realistic=(-3.0, 1.0), benign=(-2.0, -1.0)).repeat(H)


def _inputs(s: KdaShape, seqlens: list[int], dtype: torch.dtype, state_dtype: torch.dtype,
            decays: str = "realistic"):
    """Inputs of one call: decays of the --decays distribution (decay_params), states of realistic
    scale (harness.random_states)."""
    gen = torch.Generator().manual_seed(0)
    T, N = sum(seqlens), len(seqlens)
    q, k, v = (torch.randn(T, s.H, d, generator=gen).to(dtype) for d in (s.K, s.K, s.V))
    f = torch.randn(T, s.H, s.K, generator=gen).to(dtype)
    b = torch.randn(T, s.H, generator=gen).to(dtype)
    A_log, dt_bias = decay_params(s.H, s.K, decays)
    state = random_states((N + 1, s.H, s.K, s.V), state_dtype, gen)  # slot 0: vLLM's null block
    idx = torch.arange(1, N + 1, dtype=torch.int32)
    cu = torch.zeros(N + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens).cumsum(0)
    return q, k, v, f, b, A_log, dt_bias, state, idx, cu


def bench_kda_prefill(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    peaks_before = gemm_peaks()
    rows = []
    for model in args.models.split(","):
        s = MODELS[model]
        for wl, decays in itertools.product(args.workloads.split(","), args.decays):
            seqlens = WORKLOADS[wl]
            T = sum(seqlens)
            q, k, v, f, b, A_log, dt_bias, state, idx, cu = _inputs(s, seqlens, dtype, torch.float32, decays)
            g, beta = ops.kda_gate(A_log, f, b, dt_bias)
            out = torch.empty_like(v)
            bf16_products = dtype == torch.bfloat16 and path_uses_bf16_products()
            row = {"model": model, "workload": wl, "tokens": T, "dtype": args.dtype,
                   "threads": torch.get_num_threads(), "gemm": ops.runtime_info()["gemm"],
                   "gemm_products": "bf16" if bf16_products else "fp32", **decay_columns(decays, -g)}

            def ours():
                ops.chunk_kda(q, k, v, g, beta, state, idx, cu, out=out)

            t = best_time(ours, args.repeat)
            row["ours_tok_s"] = T / t
            row["ours_gflops"] = prefill_flops(s, seqlens) / t / 1e9
            if not args.no_ref and T <= args.ref_max_tokens:
                tr = best_time(lambda: reference.chunk_kda_ref(q, k, v, g, beta, state, idx, cu), 1, 0)
                row["torch_ref_tok_s"] = T / tr
                row["speedup_vs_torch_ref"] = tr / t
            if args.cpu_time:
                t1 = best_cpu_time_1t(ours, args.repeat)
                peak_1t = matmul_peak_1t(torch.bfloat16 if bf16_products else torch.float32)
                row["ours_1t_cpu_gflops"] = prefill_flops(s, seqlens) / t1 / 1e9
                row["matmul_1t_cpu_gflops"] = peak_1t
                row["ours_1t_pct_of_matmul"] = 100 * row["ours_1t_cpu_gflops"] / peak_1t
                if not args.no_ref and T <= args.ref_max_tokens:
                    tr1 = best_cpu_time_1t(lambda: reference.chunk_kda_ref(q, k, v, g, beta, state, idx, cu), 1)
                    row["speedup_vs_torch_ref_1t_cpu"] = tr1 / t1
            rows.append(row)
            print_row(row, args)
    add_roofline(rows, peaks_before)
    add_decay_ratios(rows, ("model", "workload"))
    if not args.json:
        print_roofline(rows)
    print_decay_ratios(rows, ("model", "workload"), args)
    return rows


def bench_kda_decode(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    bw = stream_gbps()
    rows = []
    for model in args.models.split(","):
        s = MODELS[model]
        for batch, decays in itertools.product([int(x) for x in args.batches.split(",")], args.decays):
            q, k, v, f, b, A_log, dt_bias, _, _, _ = _inputs(s, [1] * batch, dtype, torch.float32, decays)
            decay_cols = decay_columns(decays, -ops.kda_gate(A_log, f, b, dt_bias)[0])
            idx = torch.arange(1, batch + 1, dtype=torch.int32)  # slot 0: vLLM's null block
            out = torch.empty_like(v)
            for sdt_name in args.state_dtypes.split(","):
                sdt = getattr(torch, sdt_name)
                pools, moved = cold_state_pools(batch, (s.H, s.K, s.V), sdt, args.layers)
                layers = len(pools)

                def ours():
                    for pool in pools:
                        ops.fused_recurrent_kda(q, k, v, A_log, dt_bias, f, b, pool, idx, out=out)

                row = {"model": model, "batch": batch, "dtype": args.dtype, "state_dtype": sdt_name,
                       "layers": layers, "threads": torch.get_num_threads(), "stream_gbps": bw, **decay_cols}
                t = time_cold_decode(row, ours, layers, moved, bw, args.repeat)
                if not args.no_ref:
                    def torch_ref():
                        for pool in pools[:2]:
                            reference.fused_recurrent_kda_ref(q, k, v, A_log, dt_bias, f, b, pool, idx)

                    tr = best_time(torch_ref, 1, 0) / 2
                    row["torch_ref_us_per_layer"] = tr * 1e6
                    row["speedup_vs_torch_ref"] = tr / t
                if args.cpu_time:  # one thread, CPU time, vs stream_scale_ over as many bytes
                    cpu_time_cold_decode(row, ours, layers, moved, args.repeat)
                rows.append(row)
                print_row(row, args)
                del pools
    add_decay_ratios(rows, ("model", "batch", "state_dtype"))
    print_decay_ratios(rows, ("model", "batch", "state_dtype"), args)
    return rows


def add_parsers(sub, common) -> None:
    add_state_family_parsers(
        sub, common, "kda", models=MODELS, default_models="kimi-linear", workloads=WORKLOADS, batches="1,16",
        prefill_run=bench_kda_prefill, prefill_help="KDA chunked prefill (chunk_kda), tokens/s per layer",
        decode_run=bench_kda_decode, decode_help="KDA decode step (fused_recurrent_kda) over cold states")
