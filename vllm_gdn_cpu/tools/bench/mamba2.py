"""Mamba2 (SSD) kernel benchmarks: ours vs vLLM's CPU ops vs the plain-torch reference, side by side.

    python -m vllm_gdn_cpu.tools.bench mamba2-prefill [--models mamba2-2.7b,...] [--workloads T2048,8x256]
    python -m vllm_gdn_cpu.tools.bench mamba2-decode  [--models ...] [--batches 1,16] [--state-dtypes ...]

Prefill: vLLM's side is the function its MambaMixer2 calls on CPU (``_mamba_chunk_scan_combined_fwd_cpu``:
softplus of dt + bias, then ``torch.ops._C.mamba_chunk_scan_fwd_cpu``; it returns the final states,
which the layer then scatters into the cache: that scatter is not timed, ours writes the slots in
place). Rate in GFLOP/s counts the chunked algorithm's products (C B^T per group and chunk, per head
C S, the masked intra-chunk product and the chunk state update; triangles as half), and each row's %
is of the GEMM peak of the dtype its GEMM path multiplies in (harness.add_roofline).
Decode: ``layers`` state pools stepped in turn (cold states, as in a model); GB/s counts the state
read and written once per step, % of the in-place stream (harness.stream_gbps). vLLM's side is its CPU
``selective_state_update`` with MambaMixer2's tied shapes.
With ``--cpu-time`` each row also gets one-thread figures by CPU time (ours, vLLM's, and the limit:
torch's matmul in the path's product dtype for the prefill, stream_scale_ over as many bytes for the
decode), which a machine shared with other work distorts far less than wall time on all threads.
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

# The kernel's chunk (kernels/mamba2/chunk_scan.cpp): 128 tokens on paths with bf16 products, else 64.
CHUNK_BF16, CHUNK_F32 = 128, 64


@dataclass(frozen=True)
class SSMShape:
    name: str
    H: int  # heads
    P: int  # head dim
    G: int  # groups
    N: int  # d_state


MODELS = {
    "mamba2-2.7b": SSMShape("mamba2-2.7b", 80, 64, 1, 128),
    "nemotron-h-like": SSMShape("nemotron-h-like", 64, 64, 8, 128),
    "granite-4.0-h-like": SSMShape("granite-4.0-h-like", 48, 64, 1, 128),
}

WORKLOADS = {"T512": [512], "T2048": [2048], "8x256": [256] * 8, "16x128": [128] * 16}


def prefill_flops(s: SSMShape, seqlens: list[int], chunk: int) -> float:
    total = 0.0
    for L in seqlens:
        for c0 in range(0, L, chunk):
            n = min(chunk, L - c0)
            tri = n * (n + 1) / 2
            total += s.G * tri * s.N + s.H * (2 * n * s.N * s.P + tri * s.P)
    return 2 * total


def decay_params(H: int, decays: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A and dt_bias [H] (fp32) for a --decays value. Realistic: A = -exp(linspace(0, ln 16)) (-1..-16,
    Mamba2's A_log init range) and dt_bias = linspace(-4, -1) over the heads, which with dt ~ N(0, 1)
    give per-token decays softplus(dt + dt_bias) |A| of about 0.02 to 5 nats; strong: every head at
    A = -16, dt_bias = -1; benign: A -1..-2, dt_bias -6..-5 (about 0.01 nats)."""
    A = -torch.exp(decay_spread(decays, H, realistic=(0.0, 2.7725887), benign=(0.0, 0.6931472)))
    return A, decay_spread(decays, H, realistic=(-4.0, -1.0), benign=(-6.0, -5.0))


def decay_nats(dt: torch.Tensor, A: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Per-token, per-head decays (nats) the kernel applies: softplus(dt + dt_bias) |A|."""
    return torch.nn.functional.softplus(dt.float() + dt_bias) * -A


def _inputs(s: SSMShape, seqlens: list[int], dtype: torch.dtype, state_dtype: torch.dtype,
            decays: str = "realistic"):
    """Inputs of one prefill call: decays of the --decays distribution (decay_params), states of
    realistic scale (harness.random_states)."""
    gen = torch.Generator().manual_seed(0)
    T, Nseq = sum(seqlens), len(seqlens)
    x = torch.randn(T, s.H, s.P, generator=gen).to(dtype)
    dt = torch.randn(T, s.H, generator=gen).to(dtype)
    A, dt_bias = decay_params(s.H, decays)
    B = torch.randn(T, s.G, s.N, generator=gen).to(dtype)
    C = torch.randn(T, s.G, s.N, generator=gen).to(dtype)
    D = torch.ones(s.H)
    state = random_states((Nseq + 1, s.H, s.P, s.N), state_dtype, gen)  # slot 0: vLLM's null block
    idx = torch.arange(1, Nseq + 1, dtype=torch.int32)
    cu = torch.zeros(Nseq + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens).cumsum(0)
    return x, dt, A, B, C, D, dt_bias, state, idx, cu


def _vllm_prefill():
    try:
        from vllm.model_executor.layers.mamba.ops.cpu.mamba_ssm import _mamba_chunk_scan_combined_fwd_cpu

        return _mamba_chunk_scan_combined_fwd_cpu
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return None


def _vllm_decode():
    try:
        from vllm.model_executor.layers.mamba.ops.cpu.mamba_ssm import selective_state_update

        return selective_state_update
    except Exception:  # noqa: BLE001
        return None


def torch_prefill(x, dt, A, B, C, D, dt_bias, state, idx, cu):
    """The plain-torch chunked reference (fp32), one sequence at a time."""
    H = x.shape[1]
    dtf = reference.mamba2_dt(dt, dt_bias)
    bounds = cu.tolist()
    for i in range(len(bounds) - 1):
        s, e = bounds[i], bounds[i + 1]
        S = state[int(idx[i])].float()
        y, _ = reference.mamba2_chunked_ref(x[s:e].float(), dtf[s:e], A, B[s:e].float().repeat_interleave(
            H // B.shape[1], 1), C[s:e].float().repeat_interleave(H // B.shape[1], 1), S, chunk=CHUNK_F32)
        state[int(idx[i])] = S.to(state.dtype)


def bench_mamba2_prefill(args) -> list[dict]:
    vl = None if args.no_vllm else _vllm_prefill()
    dtype = getattr(torch, args.dtype)
    peaks_before = gemm_peaks()
    rows = []
    for model in args.models.split(","):
        s = MODELS[model]
        for wl, decays in itertools.product(args.workloads.split(","), args.decays):
            seqlens = WORKLOADS[wl]
            T = sum(seqlens)
            x, dt, A, B, C, D, dt_bias, state, idx, cu = _inputs(s, seqlens, dtype, torch.float32, decays)
            out = torch.empty_like(x)
            bf16_products = dtype == torch.bfloat16 and path_uses_bf16_products()
            row = {"model": model, "workload": wl, "tokens": T, "dtype": args.dtype,
                   "threads": torch.get_num_threads(), "gemm": ops.runtime_info()["gemm"],
                   "gemm_products": "bf16" if bf16_products else "fp32", **decay_columns(decays, decay_nats(dt, A, dt_bias))}
            t = best_time(lambda: ops.mamba2_chunk_scan(x, dt, A, B, C, D, dt_bias, state, idx, cu, out=out),
                          args.repeat)
            row["ours_tok_s"] = T / t
            chunk = CHUNK_BF16 if bf16_products else CHUNK_F32
            row["ours_gflops"] = prefill_flops(s, seqlens, chunk) / t / 1e9
            if vl is not None:
                out_v = torch.empty_like(x)
                init = state[idx.long()]

                def vllm():
                    vl(x, dt, A, B, C, 256, out_v, D=D, dt_bias=dt_bias, initial_states=init, cu_seqlens=cu,
                       dt_softplus=True, state_dtype=torch.float32)

                try:
                    tv = best_time(vllm, args.repeat)
                    row["vllm_tok_s"] = T / tv
                    row["speedup_vs_vllm"] = tv / t
                except RuntimeError as e:
                    row["vllm_error"] = str(e).splitlines()[0][:120]
            if not args.no_ref and T <= args.ref_max_tokens:
                tr = best_time(lambda: torch_prefill(x, dt, A, B, C, D, dt_bias, state, idx, cu), 1, 0)
                row["torch_ref_tok_s"] = T / tr
                row["speedup_vs_torch_ref"] = tr / t
            if args.cpu_time:  # one thread, CPU time: robust to a loaded machine
                peak_1t = matmul_peak_1t(torch.bfloat16 if bf16_products else torch.float32)
                t1 = best_cpu_time_1t(
                    lambda: ops.mamba2_chunk_scan(x, dt, A, B, C, D, dt_bias, state, idx, cu, out=out), args.repeat)
                row["ours_1t_cpu_gflops"] = prefill_flops(s, seqlens, chunk) / t1 / 1e9
                row["matmul_1t_cpu_gflops"] = peak_1t
                row["ours_1t_pct_of_matmul"] = 100 * row["ours_1t_cpu_gflops"] / peak_1t
                if vl is not None and "vllm_tok_s" in row:
                    tv1 = best_cpu_time_1t(vllm, args.repeat)
                    row["vllm_1t_cpu_tok_s"] = T / tv1
                    row["speedup_vs_vllm_1t_cpu"] = tv1 / t1
            rows.append(row)
            print_row(row, args)
    add_roofline(rows, peaks_before)
    add_decay_ratios(rows, ("model", "workload"))
    if not args.json:
        print_roofline(rows)
    print_decay_ratios(rows, ("model", "workload"), args)
    return rows


def bench_mamba2_decode(args) -> list[dict]:
    vl = None if args.no_vllm else _vllm_decode()
    dtype = getattr(torch, args.dtype)
    bw = stream_gbps()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for model in args.models.split(","):
        s = MODELS[model]
        for batch, decays in itertools.product([int(b) for b in args.batches.split(",")], args.decays):
            x = torch.randn(batch, s.H, s.P, generator=gen).to(dtype)
            dt = torch.randn(batch, s.H, generator=gen).to(dtype)
            A, dt_bias = decay_params(s.H, decays)
            B = torch.randn(batch, s.G, s.N, generator=gen).to(dtype)
            C = torch.randn(batch, s.G, s.N, generator=gen).to(dtype)
            D = torch.ones(s.H)
            idx = torch.arange(1, batch + 1, dtype=torch.int32)  # slot 0: vLLM's null block
            out = torch.empty_like(x)
            for sdt_name in args.state_dtypes.split(","):
                sdt = getattr(torch, sdt_name)
                pools, moved = cold_state_pools(batch, (s.H, s.P, s.N), sdt, args.layers)
                layers = len(pools)

                def ours():
                    for pool in pools:
                        ops.mamba2_state_update(x, dt, A, B, C, D, dt_bias, pool, idx, out=out)

                row = {"model": model, "batch": batch, "dtype": args.dtype, "state_dtype": sdt_name,
                       "layers": layers, "threads": torch.get_num_threads(), "stream_gbps": bw,
                       **decay_columns(decays, decay_nats(dt, A, dt_bias))}
                t = time_cold_decode(row, ours, layers, moved, bw, args.repeat)
                if vl is not None:
                    A_v = A[:, None, None].expand(s.H, s.P, s.N)
                    dt_v = dt[:, :, None].expand(batch, s.H, s.P)
                    D_v, bias_v = D[:, None].expand(s.H, s.P), dt_bias[:, None].expand(s.H, s.P)

                    def vllm():
                        for pool in pools:
                            vl(pool, x, dt_v, A_v, B, C, D_v, None, bias_v, dt_softplus=True,
                               state_batch_indices=idx, dst_state_batch_indices=idx, out=out)

                    try:
                        tv = best_time(vllm, args.repeat) / layers
                        row["vllm_us_per_layer"] = tv * 1e6
                        row["speedup_vs_vllm"] = tv / t
                    except (RuntimeError, AssertionError) as e:  # e.g. a state dtype it refuses
                        row["vllm_error"] = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                if not args.no_ref:
                    def torch_ref():
                        for pool in pools[:2]:
                            reference.mamba2_state_update_ref(x, dt, A, B, C, D, dt_bias, pool, idx)

                    tr = best_time(torch_ref, 1, 0) / 2
                    row["torch_ref_us_per_layer"] = tr * 1e6
                    row["speedup_vs_torch_ref"] = tr / t
                if args.cpu_time:  # one thread, CPU time, vs stream_scale_ over as many bytes
                    t1 = cpu_time_cold_decode(row, ours, layers, moved, args.repeat)
                    if "vllm_us_per_layer" in row:
                        tv1 = best_cpu_time_1t(vllm, args.repeat) / layers
                        row["vllm_1t_cpu_us_per_layer"] = tv1 * 1e6
                        row["speedup_vs_vllm_1t_cpu"] = tv1 / t1
                rows.append(row)
                print_row(row, args)
    add_decay_ratios(rows, ("model", "batch", "state_dtype"))
    print_decay_ratios(rows, ("model", "batch", "state_dtype"), args)
    return rows


def add_parsers(sub, common) -> None:
    add_state_family_parsers(
        sub, common, "mamba2", models=MODELS, default_models="mamba2-2.7b,nemotron-h-like", workloads=WORKLOADS, batches="1,16",
        prefill_run=bench_mamba2_prefill, prefill_help="Mamba2 chunked SSD prefill, tokens/s per layer",
        decode_run=bench_mamba2_decode, decode_help="Mamba2 decode step over cold states")
