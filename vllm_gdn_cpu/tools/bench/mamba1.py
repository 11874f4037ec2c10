"""Mamba-1 selective-scan benchmarks: ours vs the plain-torch reference, side by side.

    python -m vllm_gdn_cpu.tools.bench mamba1-prefill [--models mamba-2.8b,...] [--workloads T2048,8x256] [--cpu-time]
    python -m vllm_gdn_cpu.tools.bench mamba1-decode  [--models ...] [--batches 1,16,64] [--state-dtypes ...]

vLLM 0.32 has no CPU op for either (its MambaMixer calls ``torch.ops._C.selective_scan_fwd``, which
no CPU build has, and its CPU ``selective_state_update`` takes only Mamba2's 4-D state), so there is
no vLLM column: the comparison is the plain-torch token loop of ``vllm_gdn_cpu.reference.mamba1``
(fp32).
Prefill: tokens/s per layer, and "updates" = tokens x Dm x N state updates per second (each one
exp(dt A), two FMAs and a product with C: the scan is bound by its exps, not by memory or GEMMs).
Decode: ``layers`` state pools stepped in turn (cold states, as in a model), each layer with its own
A (a [Dm, N] fp32, as large as one fp32 state, read once per call: cold too in a model); GB/s counts
the state read and written once per step, % of the in-place stream (harness.stream_gbps); the
``*_with_A`` figures add A's bytes (read once per call; at batch 1 half the fp32 state's traffic).
With ``--cpu-time`` each row also gets one-thread figures by CPU time (prefill: ours and the
reference; decode: ours against stream_scale_ over as many bytes), which a machine shared with other
work distorts far less than wall time on all threads.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from vllm_gdn_cpu import ops, reference
from vllm_gdn_cpu.tools.bench.harness import (
    add_decay_ratios,
    add_state_family_parsers,
    best_cpu_time_1t,
    best_time,
    cold_state_pools,
    cpu_time_cold_decode,
    decay_columns,
    decay_spread,
    print_decay_ratios,
    print_row,
    random_states,
    stream_gbps,
    time_cold_decode,
)

NO_VLLM = ("vLLM 0.32 has no CPU selective scan (MambaMixer needs torch.ops._C.selective_scan_fwd; its CPU "
           "selective_state_update takes Mamba2's 4-D state only): ours vs the plain-torch reference")


@dataclass(frozen=True)
class M1Shape:
    name: str
    Dm: int  # d_inner (per TP rank)
    N: int   # d_state


MODELS = {
    "mamba-2.8b": M1Shape("mamba-2.8b", 5120, 16),
    "mamba-130m": M1Shape("mamba-130m", 1536, 16),
    "falcon-mamba-7b": M1Shape("falcon-mamba-7b", 8192, 16),
}

WORKLOADS = {"T512": [512], "T2048": [2048], "8x256": [256] * 8, "16x128": [128] * 16}


def _weights(s: M1Shape, gen: torch.Generator, decays: str = "realistic"):
    """A as a trained Mamba's (S4D-real init -(n+1), spread per channel), D, dt_bias of the --decays
    distribution: realistic dt_bias = linspace(-6, -1) over the channels, which with dt ~ N(0, 1)
    gives per-token decays softplus(dt + dt_bias) |A| of about 0.003 to 10 nats; strong: every channel
    at dt_bias = -1; benign: dt_bias -8..-7 (a few hundredths of a nat at most)."""
    A = -(torch.arange(1, s.N + 1, dtype=torch.float32)[None, :] * torch.exp(0.5 * torch.randn(s.Dm, 1, generator=gen)))
    return A, torch.ones(s.Dm), decay_spread(decays, s.Dm, realistic=(-6.0, -1.0), benign=(-8.0, -7.0))


def decay_nats(dt: torch.Tensor, A: torch.Tensor, dt_bias: torch.Tensor, tokens: int = 16) -> torch.Tensor:
    """Per-token decays (nats) of the first `tokens` tokens, every channel and state:
    softplus(dt + dt_bias) |A|."""
    return torch.nn.functional.softplus(dt[:tokens].float() + dt_bias)[:, :, None] * -A


def _prefill_inputs(s: M1Shape, seqlens: list[int], dtype: torch.dtype, decays: str = "realistic"):
    gen = torch.Generator().manual_seed(0)
    T, Nseq = sum(seqlens), len(seqlens)
    x, z, dt = (torch.randn(T, s.Dm, generator=gen).to(dtype) for _ in range(3))
    B, C = (torch.randn(T, s.N, generator=gen).to(dtype) for _ in range(2))
    A, D, dt_bias = _weights(s, gen, decays)
    state = random_states((Nseq + 1, s.Dm, s.N), torch.float32, gen)  # slot 0: vLLM's null block
    idx = torch.arange(1, Nseq + 1, dtype=torch.int32)
    cu = torch.zeros(Nseq + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens).cumsum(0)
    return x, dt, A, B, C, D, z, dt_bias, state, idx, cu


def bench_mamba1_prefill(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    if not args.json:
        print(f"# {NO_VLLM}", flush=True)
    rows = []
    for model in args.models.split(","):
        s = MODELS[model]
        for wl, decays in itertools.product(args.workloads.split(","), args.decays):
            seqlens = WORKLOADS[wl]
            T = sum(seqlens)
            x, dt, A, B, C, D, z, dt_bias, state, idx, cu = _prefill_inputs(s, seqlens, dtype, decays)
            out = torch.empty_like(x)

            def ours():
                ops.selective_scan(x, dt, A, B, C, D, z, dt_bias, state, idx, cu, out=out)

            def torch_ref():
                reference.selective_scan_ref(x, dt, A, B, C, D, z, dt_bias, state, idx, cu)

            row = {"model": model, "workload": wl, "tokens": T, "dtype": args.dtype,
                   "threads": torch.get_num_threads(), **decay_columns(decays, decay_nats(dt, A, dt_bias))}
            t = best_time(ours, args.repeat)
            row["ours_tok_s"] = T / t
            row["ours_gupdates_s"] = T * s.Dm * s.N / t / 1e9
            if not args.no_ref and T <= args.ref_max_tokens:
                tr = best_time(torch_ref, 1, 0)
                row["torch_ref_tok_s"] = T / tr
                row["speedup_vs_torch_ref"] = tr / t
            if args.cpu_time:  # one thread, CPU time: robust to a loaded machine
                t1 = best_cpu_time_1t(ours, args.repeat)
                row["ours_1t_cpu_tok_s"] = T / t1
                row["ours_1t_cpu_gupdates_s"] = T * s.Dm * s.N / t1 / 1e9
                if not args.no_ref and T <= args.ref_max_tokens:
                    row["speedup_vs_torch_ref_1t_cpu"] = best_cpu_time_1t(torch_ref, 1) / t1
            rows.append(row)
            print_row(row, args)
    add_decay_ratios(rows, ("model", "workload"))
    print_decay_ratios(rows, ("model", "workload"), args)
    return rows


def bench_mamba1_decode(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    if not args.json:
        print(f"# {NO_VLLM}", flush=True)
    bw = stream_gbps()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for model in args.models.split(","):
        s = MODELS[model]
        for batch, decays in itertools.product([int(b) for b in args.batches.split(",")], args.decays):
            A, D, dt_bias = _weights(s, gen, decays)
            x, z, dt = (torch.randn(batch, s.Dm, generator=gen).to(dtype) for _ in range(3))
            B, C = (torch.randn(batch, s.N, generator=gen).to(dtype) for _ in range(2))
            idx = torch.arange(1, batch + 1, dtype=torch.int32)  # slot 0: vLLM's null block
            out = torch.empty_like(x)
            for sdt_name in args.state_dtypes.split(","):
                sdt = getattr(torch, sdt_name)
                pools, moved = cold_state_pools(batch, (s.Dm, s.N), sdt, args.layers)
                layers = len(pools)
                As = [A.clone() for _ in pools]  # one per layer: cold as the states
                a_bytes = A.numel() * A.element_size()

                def ours():
                    for pool, A_l in zip(pools, As):
                        ops.selective_state_update(x, dt, A_l, B, C, D, z, dt_bias, pool, idx, out=out)

                row = {"model": model, "batch": batch, "dtype": args.dtype, "state_dtype": sdt_name,
                       "layers": layers, "threads": torch.get_num_threads(), "stream_gbps": bw,
                       **decay_columns(decays, decay_nats(dt, A, dt_bias))}
                t = time_cold_decode(row, ours, layers, moved, bw, args.repeat)
                row["ours_gbps_with_A"] = (moved + a_bytes) / t / 1e9
                row["ours_pct_of_stream_with_A"] = 100 * row["ours_gbps_with_A"] / bw
                if not args.no_ref:
                    def torch_ref():
                        for pool in pools[:2]:
                            reference.selective_state_update_ref(x, dt, A, B, C, D, z, dt_bias, pool, idx)

                    tr = best_time(torch_ref, 1, 0) / 2
                    row["torch_ref_us_per_layer"] = tr * 1e6
                    row["speedup_vs_torch_ref"] = tr / t
                if args.cpu_time:  # one thread, CPU time, vs stream_scale_ over as many bytes
                    t1 = cpu_time_cold_decode(row, ours, layers, moved, args.repeat)
                    row["ours_1t_cpu_gbps_with_A"] = (moved + a_bytes) / t1 / 1e9
                    row["ours_1t_pct_of_stream_with_A"] = 100 * row["ours_1t_cpu_gbps_with_A"] / row["stream_1t_cpu_gbps"]
                rows.append(row)
                print_row(row, args)
    add_decay_ratios(rows, ("model", "batch", "state_dtype"))
    print_decay_ratios(rows, ("model", "batch", "state_dtype"), args)
    return rows


def add_parsers(sub, common) -> None:
    add_state_family_parsers(
        sub, common, "mamba1", models=MODELS, default_models="mamba-2.8b", workloads=WORKLOADS, batches="1,16,64",
        prefill_run=bench_mamba1_prefill, prefill_help="Mamba-1 selective scan prefill, tokens/s per layer",
        decode_run=bench_mamba1_decode, decode_help="Mamba-1 decode step over cold states")
