"""Kernel benchmarks: ours vs vLLM's built-in CPU ops vs a plain-torch reference, side by side.

    python -m vllm_gdn_cpu.tools.bench prefill [--models qwen3-next,...] [--workloads T512,...] [--json]
    python -m vllm_gdn_cpu.tools.bench prefill --heads 1,4,8 --workloads T8192 --scaling [--schedules auto,sequential]
    python -m vllm_gdn_cpu.tools.bench decode  [--batches 1,16,64] [--splits auto,heads] [--layers N] [--json]
    python -m vllm_gdn_cpu.tools.bench roofline                             (limits; per-core scaling ceiling)
    python -m vllm_gdn_cpu.tools.bench overhead [--state-dtype float32]   (fixed per-call cost, decode B=1)
    python -m vllm_gdn_cpu.tools.bench e2e [--batches 1,16] [--tp 2]        (inside vLLM: ours vs built-in)
    python -m vllm_gdn_cpu.tools.bench mamba2-prefill | mamba2-decode ...   (Mamba2 SSD: tools/bench_mamba2.py)
    python -m vllm_gdn_cpu.tools.bench kda-prefill | kda-decode ...         (KDA / Kimi-Linear: tools/bench_kda.py)
    python -m vllm_gdn_cpu.tools.bench mamba1-prefill | mamba1-decode ...   (Mamba-1 selective scan: tools/bench_mamba1.py)
    python -m vllm_gdn_cpu.tools.bench gemv [--shapes NxK,...] [--ms 1,4,16]  (projections: tools/bench_gemv.py)

Every figure comes from the same process and the same run: rates of each implementation, their
ratios, and percentages of limits measured here (bf16/fp32 GEMM throughput of a large torch
matmul; in-place read+write stream bandwidth). Needs only torch; the vLLM columns appear when vLLM
is importable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from vllm_gdn_cpu import ops, reference

CHUNK = 64


@dataclass(frozen=True)
class HeadShape:
    name: str
    Hk: int
    Hv: int
    K: int
    V: int


MODELS = {
    "qwen3-next": HeadShape("qwen3-next", 16, 32, 128, 128),
    "qwen3.5-small": HeadShape("qwen3.5-small", 16, 16, 128, 128),
    "olmo-hybrid": HeadShape("olmo-hybrid", 16, 16, 96, 192),
}

PREFILL_WORKLOADS = {
    "T512": [512],
    "T2048": [2048],
    "T8192": [8192],
    "16x128": [128] * 16,
    "8x512": [512] * 8,
    "mixed": [1, 37, 300, 64, 1000, 5, 129, 512],
}


def best_time(fn: Callable[[], object], repeat: int, min_time: float = 0.2) -> float:
    """Best wall time of fn() over `repeat` timed runs (after one warm-up), at least min_time total."""
    fn()
    best, total, n = float("inf"), 0.0, 0
    while n < repeat or total < min_time:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, total, n = min(best, dt), total + dt, n + 1
        if n >= 50 * repeat:
            break
    return best


# ----------------------------------------------------------------------------- limits


def gemm_peak_gflops(dtype: torch.dtype, budget_s: float = 1.0, max_n: int = 2048) -> float:
    """Throughput of torch's square matmul in `dtype`, bounded to about `budget_s` seconds on any CPU.

    The size doubles from 128 while one product takes under a twentieth of the budget (up to
    max_n), then the best of a few products in the rest of the budget counts. Where the CPU has no
    native form of the dtype (bf16 without AVX512-BF16/AMX, where one 2048^3 product takes
    minutes), the size stays small and the figure is that of the emulation, not 0."""
    n, t_one = 128, 0.0
    while True:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.matmul(a, b)  # warm-up (packing, thread pool)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        t_one = time.perf_counter() - t0
        if t_one >= budget_s / 20 or n >= max_n:
            break
        n *= 2
    best, deadline = t_one, time.perf_counter() + budget_s / 2
    for _ in range(5):
        if time.perf_counter() > deadline:
            break
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def core_scaling(threads: int, seconds: float = 0.5) -> dict:
    """Per-core rate of the prefill's GEMM engine (ops.gemm_probe: L2-resident chunk-sized
    products) on one thread alone and with `threads` threads computing at once (their median), in
    bf16 mode (AMX or vdpbf16ps where the path has it) and fp32 mode, and the scaling ceiling this
    implies for a compute-bound kernel: threads x (rate with all busy / rate alone)."""
    row = {}
    for name, bf16 in (("bf16", True), ("fp32", False)):
        torch._C.set_num_threads(1)  # torch._C's: an in-process vLLM worker disables torch.set_num_threads
        alone = ops.gemm_probe(bf16, seconds)[0].item()
        torch._C.set_num_threads(threads)
        loaded = statistics.median(ops.gemm_probe(bf16, seconds).tolist())
        row[f"core_{name}_gflops_alone"] = alone
        row[f"core_{name}_gflops_all_busy"] = loaded
        row[f"{name}_scaling_ceiling"] = threads * loaded / alone
    return row


def last_level_cache_bytes() -> int:
    """Size of the largest cache the kernel reports for CPU 0 (0 when unknown). VMs may report a
    large shared L3 (480 MiB seen on one Xeon VM)."""
    largest = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(f"{base}/{entry}/size") as f:
                    text = f.read().strip()
            except OSError:
                continue
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            largest = max(largest, int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return largest


# State pools and stream buffers this large do not stay in the caches between visits.
COLD_STATE_BYTES = max(512 * 2**20, 3 * last_level_cache_bytes())


def stream_gbps(gib: Optional[float] = None, repeat: int = 5) -> float:
    """In-place read+write bandwidth over a buffer far larger than the caches (every byte read and
    written once: the traffic of a decode step over cold states); by default 1 GiB or three times
    the last-level cache, whichever is larger. The better of torch's x.mul_ and
    our stream_scale_ probe (vector loop with software prefetch, as the decode kernel streams;
    torch's loop reaches ~85% of it here), so "% of stream" is against what the CPU can do."""
    nbytes = max(2**30, 3 * last_level_cache_bytes()) if gib is None else int(gib * 2**30)
    x = torch.ones(nbytes // 4)
    best = min(best_time(lambda: x.mul_(1.0), repeat), best_time(lambda: ops.stream_scale_(x, 1.0), repeat))
    return 2 * x.numel() * 4 / best / 1e9


# ----------------------------------------------------------------------------- vLLM built-ins


def vllm_ops():
    """vLLM's built-in CPU GDN ops, or None when vLLM (or its CPU kernels) is not importable."""
    try:
        import vllm._custom_ops  # noqa: F401  (loads vllm._C)

        return torch.ops._C.chunk_gated_delta_rule_cpu, torch.ops._C.fused_sigmoid_gating_delta_rule_update_cpu
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return None


# ----------------------------------------------------------------------------- prefill


def prefill_flops_per_token(h: HeadShape, seqlens: list[int]) -> float:
    """FLOPs the chunked algorithm needs (GEMMs + triangular inverse), averaged per token. Products
    with a triangular operand (k k^T, q k^T, T (k decay), T v, Aqk v_new) count as half: the zero
    triangle is no work to do (earlier figures counted them whole, ~1.3x more at K = V = 128)."""
    total = 0.0
    for L in seqlens:
        for c0 in range(0, L, CHUNK):
            c = min(CHUNK, L - c0)
            gemms = 1.5 * c * c * h.K + c * c * h.V + 3 * c * h.K * h.V
            total += 2 * (gemms + c**3 / 6)
    return total * h.Hv / sum(seqlens)


def prefill_inputs(h: HeadShape, seqlens: list[int], dtype: torch.dtype):
    T, N = sum(seqlens), len(seqlens)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(T, h.Hk, h.K, generator=gen).to(dtype)
    k = torch.randn(T, h.Hk, h.K, generator=gen).to(dtype)
    v = torch.randn(T, h.Hv, h.V, generator=gen).to(dtype)
    g, beta = ops.gdn_gating(torch.zeros(h.Hv), torch.randn(T, h.Hv, generator=gen),
                             torch.randn(T, h.Hv, generator=gen), torch.zeros(h.Hv))
    state = torch.zeros(N, h.Hv, h.K, h.V)
    idx = torch.arange(N, dtype=torch.int32)
    cu = torch.zeros(N + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens).cumsum(0)
    return q, k, v, g, beta, state, idx, cu


def torch_prefill(q, k, v, g, beta, state, idx, cu, ratio):
    """The plain-torch chunked reference, one sequence at a time (fp32)."""
    scale = q.shape[-1] ** -0.5
    bounds = cu.tolist()
    for i in range(len(bounds) - 1):
        s, e = bounds[i], bounds[i + 1]
        S = state[int(idx[i])]
        reference.chunk_gated_delta_rule_chunked_ref(
            q[s:e].float().repeat_interleave(ratio, 1), k[s:e].float().repeat_interleave(ratio, 1),
            v[s:e].float(), g[s:e], beta[s:e], S, scale=scale,
        )


def gemm_peaks() -> dict:
    return {"bf16_gemm_gflops": gemm_peak_gflops(torch.bfloat16), "fp32_gemm_gflops": gemm_peak_gflops(torch.float32)}


def path_uses_bf16_products(gemm: Optional[str] = None) -> bool:
    """Whether the prefill's GEMM path (the active one, or `gemm` by VLLM_GDN_CPU_GEMM name) multiplies
    bf16 operands (amx, avx512_bf16) rather than fp32 ones. runtime_info() marks fp32 paths "-fp32"."""
    if gemm is None:
        return not ops.runtime_info()["gemm"].endswith("-fp32")
    return gemm in ("amx", "avx512_bf16")


def engine_gflops(gemm: str, bf16: bool, seconds: float = 0.3) -> float:
    """All threads at once running our GEMM engine `gemm` (a VLLM_GDN_CPU_GEMM name, "-fp32" suffix
    allowed) on L2-resident chunk-sized products (ops.gemm_probe), summed: what that path itself
    reaches in cache, with no memory traffic."""
    saved = os.environ.get(ops.GEMM_ENV)
    os.environ[ops.GEMM_ENV] = gemm.removesuffix("-fp32")
    try:
        return float(ops.gemm_probe(bf16, seconds).sum())
    finally:
        if saved is None:
            os.environ.pop(ops.GEMM_ENV, None)
        else:
            os.environ[ops.GEMM_ENV] = saved


def add_roofline(rows: list[dict], before: dict) -> None:
    """Each row gets the GEMM peak of the dtype its GEMM path multiplies in and its % of that peak:
    the better of torch's matmul in that dtype (bf16 for the amx/avx512_bf16 paths, fp32 otherwise)
    and our own engine on that path in cache (engine_gflops), so a path that multiplies fp32
    operands is never compared with a bf16 peak it could not have used, nor with a BLAS that runs
    below what our micro-kernels reach. Torch's peaks are measured before and after the rows (best of
    both, so a noisy moment cannot inflate the percentages)."""
    after = gemm_peaks()
    peaks = {k: max(before[k], after[k]) for k in before}
    engine: dict = {}
    for row in rows:
        row.update(peaks)
        dtype = "bf16" if row["gemm_products"] == "bf16" else "fp32"
        key = (row["gemm"], dtype)
        if key not in engine:
            engine[key] = engine_gflops(row["gemm"], dtype == "bf16")
        row["engine_gflops"] = engine[key]
        row["path_gemm_peak_gflops"] = max(peaks[f"{dtype}_gemm_gflops"], engine[key])
        row["pct_of_path_gemm_peak"] = 100 * row["ours_gflops"] / row["path_gemm_peak_gflops"]


def print_roofline(rows: list[dict]) -> None:
    """The peaks of a prefill run and each row's share of its path's peak (after add_roofline)."""
    print(f"# GEMM peaks measured in this run (torch matmul): {rows[0]['bf16_gemm_gflops']:.0f} GFLOP/s bf16, "
          f"{rows[0]['fp32_gemm_gflops']:.0f} GFLOP/s fp32; each row against the peak of the dtype its "
          f"GEMM path multiplies in (the better of torch's and our engine's in cache):")
    for row in rows:
        print(f"#   {row['model']} {row['workload']} ({row['gemm']}, {row['gemm_products']} products, engine "
              f"{row['engine_gflops']:.0f} GFLOP/s): {row['ours_gflops']:.0f} GFLOP/s, "
              f"{row['pct_of_path_gemm_peak']:.0f}% of {row['path_gemm_peak_gflops']:.0f}")


def best_time_per_config(fn: Callable[[], object], configs: dict, repeat: int, rounds: int = 3) -> dict:
    """Best time of fn under each config (label -> (environment overrides, torch threads)), the
    configs' measurements interleaved over `rounds` so that a noisy machine's drift reaches all alike."""
    best = {label: float("inf") for label in configs}
    saved_threads = torch.get_num_threads()
    for _ in range(rounds):
        for label, (env, threads) in configs.items():
            saved = {name: os.environ.get(name) for name in env}
            os.environ.update(env)
            torch._C.set_num_threads(threads)  # torch._C's: see core_scaling
            try:
                best[label] = min(best[label], best_time(fn, repeat))
            finally:
                torch._C.set_num_threads(saved_threads)
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
    return best


def prefill_schedule_of(fn: Callable[[], object]) -> str:
    """The schedule (VLLM_GDN_CPU_PREFILL_SCHEDULE) that one call of fn ran."""
    before = ops.prefill_schedule_counts()
    fn()
    after = ops.prefill_schedule_counts()
    return ",".join(name for name in after if after[name] > before[name])


def prefill_shapes(args) -> list[tuple[str, HeadShape]]:
    """--heads H,...: one tensor-parallel-shard shape per H (Hk = Hv = H, K = V = 128); else --models."""
    if args.heads:
        return [(f"h{H}", HeadShape(f"h{H}", int(H), int(H), 128, 128)) for H in args.heads.split(",")]
    return [(model, MODELS[model]) for model in args.models.split(",")]


def schedule_entry(entry: Optional[str]) -> tuple[Optional[str], dict]:
    """A --schedules entry: a VLLM_GDN_CPU_PREFILL_SCHEDULE value, optionally followed by
    +NAME=VALUE environment settings for that configuration (e.g. chunk_parallel+VLLM_GDN_CPU_ISA=avx512)."""
    if not entry:
        return entry, {}
    sched, *extra = entry.split("+")
    return sched or None, dict(item.split("=", 1) for item in extra)


PHASES_ENV = "VLLM_GDN_CPU_PREFILL_PHASES"  # kernels/gdn/prefill_schedule.h: per-phase timers, bench only
PHASE_NAMES = ["calls", "wall", "prepare", "pass", "wait", "start", "end", "busiest_pass", "prepare_tasks",
               "pass_steps", "threads", "regions", "output", "output_tasks"]


def print_prefill_phases(row: dict, fn: Callable[[], object], configs: dict, calls: int = 8) -> None:
    """Where the chunk-parallel schedule's time goes, per configuration (label -> (env, threads)) that
    runs it: `calls` calls timed with the per-phase timers on (VLLM_GDN_CPU_PREFILL_PHASES=1). Shares
    are of the threads' summed time (wall x threads): preparation, state pass, waiting for a
    dependency or a join, the fork (to a thread's first work) and the tail (its last work to the join)."""
    saved_threads = torch.get_num_threads()
    for label, (env, threads) in configs.items():
        saved = {name: os.environ.get(name) for name in (*env, PHASES_ENV)}
        os.environ.update({**env, PHASES_ENV: "1"})
        torch._C.set_num_threads(threads)
        try:
            for _ in range(2):  # warm-up (a changed thread count may start threads)
                fn()
            torch.ops.vllm_gdn_cpu.prefill_phase_times(True)
            for _ in range(calls):
                fn()
            ph = dict(zip(PHASE_NAMES, torch.ops.vllm_gdn_cpu.prefill_phase_times(True)))
        finally:
            torch._C.set_num_threads(saved_threads)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        n = ph["calls"]
        if n == 0:
            continue  # this configuration ran the sequential walk
        wall = ph["wall"] / n
        total = ph["wall"] * ph["threads"] or 1.0  # the threads' summed time over the calls
        pct = {k: 100 * ph[k] / total * n for k in ("prepare", "pass", "output", "wait", "start", "end")}
        print(f"# phases {row['model']} {row['workload']} {label} ({threads} threads): {wall * 1e6:.0f} us per call, "
              f"{ph['regions'] / n:.0f} parallel regions, {ph['threads'] / n:.0f} threads took part; of their time "
              + ", ".join(f"{k} {v:.1f}%" for k, v in pct.items())
              + f"; busiest thread's state pass {100 * ph['busiest_pass'] / n / wall:.0f}% of the wall; "
              f"per preparation task {1e6 * ph['prepare'] / max(ph['prepare_tasks'], 1):.1f} us, "
              f"per state-pass step {1e6 * ph['pass'] / max(ph['pass_steps'], 1):.2f} us "
              f"({ph['pass_steps'] / n:.0f} steps), per output task "
              f"{1e6 * ph['output'] / max(ph['output_tasks'], 1):.1f} us ({ph['output_tasks'] / n:.0f})", flush=True)


def bench_prefill(args) -> list[dict]:
    """Ours on each shape and workload. With --gemms / --schedules, ours on each GEMM path x schedule,
    interleaved (the first combination is "ours", with its speed-up over each other); with
    --scaling, each of those also on one thread (interleaved with all threads): scaling_<config> =
    one-thread time / all-threads time, beside the compute-bound scaling ceiling that bench roofline
    measures (core_scaling: the GEMM engine's per-core rate with every core busy vs alone), measured
    in this run on the first GEMM path, and its % of that ceiling."""
    vl = None if args.no_vllm else vllm_ops()
    dtype = getattr(torch, args.dtype)
    peaks_before = gemm_peaks()
    threads = torch.get_num_threads()
    paths = args.gemms.split(",") if args.gemms else [None]
    schedules = args.schedules.split(",") if args.schedules else [None]
    configs = {}
    for path in paths:
        for entry in schedules:
            sched, extra = schedule_entry(entry)
            env = {**({ops.GEMM_ENV: path} if path else {}), **({ops.PREFILL_SCHEDULE_ENV: sched} if sched else {}),
                   **extra}
            label = "/".join(x for x in (path, entry) if x) or "ours"
            configs[label] = (env, threads)
            if args.scaling:
                configs[f"{label}@1t"] = (env, 1)
    bases = [label for label in configs if not label.endswith("@1t")]
    ceilings = {}
    if args.scaling:
        saved = os.environ.get(ops.GEMM_ENV)
        if paths[0]:
            os.environ[ops.GEMM_ENV] = paths[0]
        try:
            ceilings = core_scaling(threads)
        finally:
            torch._C.set_num_threads(threads)
            if saved is None:
                os.environ.pop(ops.GEMM_ENV, None)
            else:
                os.environ[ops.GEMM_ENV] = saved
        if not args.json:
            print(f"# scaling ceiling at {threads} threads (per-core GEMM rate all busy / alone, x threads): "
                  f"bf16 {ceilings['bf16_scaling_ceiling']:.2f}, fp32 {ceilings['fp32_scaling_ceiling']:.2f}", flush=True)
    rows = []
    for model, h in prefill_shapes(args):
        for wl in args.workloads.split(","):
            seqlens = PREFILL_WORKLOADS[wl]
            T = sum(seqlens)
            q, k, v, g, beta, state, idx, cu = prefill_inputs(h, seqlens, dtype)
            out = torch.empty_like(v)
            gemm = paths[0]
            bf16_products = dtype == torch.bfloat16 and path_uses_bf16_products(gemm)
            row = {"model": model, "workload": wl, "tokens": T, "dtype": args.dtype, "threads": threads,
                   "gemm": gemm or ops.runtime_info()["gemm"], "gemm_products": "bf16" if bf16_products else "fp32"}
            ours = lambda: ops.chunk_gated_delta_rule(q, k, v, g, beta, state, idx, cu, out=out)  # noqa: E731
            row["auto_schedule"] = prefill_schedule_of(ours)
            if len(configs) > 1:  # side by side; the first is "ours"
                times = best_time_per_config(ours, configs, args.repeat)
                t = times[bases[0]]
                for label in configs:
                    row[f"tok_s_{label}"] = T / times[label]
                for label in bases[1:]:
                    row[f"{bases[0]}_vs_{label}"] = times[label] / t
                if args.scaling:
                    ceiling = ceilings[f"{row['gemm_products']}_scaling_ceiling"]
                    row["scaling_ceiling"] = ceiling
                    for label in bases:
                        row[f"scaling_{label}"] = times[f"{label}@1t"] / times[label]
                        row[f"pct_of_ceiling_{label}"] = 100 * row[f"scaling_{label}"] / ceiling
            else:
                t = best_time(ours, args.repeat)
            if args.phases:
                print_prefill_phases(row, ours, configs)
            row["ours_tok_s"] = T / t
            flops = prefill_flops_per_token(h, seqlens) * T
            row["ours_gflops"] = flops / t / 1e9
            if vl is not None and dtype == torch.bfloat16:
                chunk_vllm = vl[0]
                # vLLM's kernel takes [1, T, ...] inputs, g in fp32 and beta in the model dtype.
                args_v = (q[None], k[None], v[None], g[None], beta.to(dtype)[None], state, True, cu, False, True,
                          idx, 1e-6)
                try:
                    tv = best_time(lambda: chunk_vllm(*args_v), args.repeat)
                    row["vllm_tok_s"] = T / tv
                    row["speedup_vs_vllm"] = tv / t
                except RuntimeError as e:  # e.g. K != V, which vLLM's kernel refuses
                    row["vllm_error"] = str(e).splitlines()[0][:120]
            if not args.no_ref and T <= args.ref_max_tokens:
                tr = best_time(lambda: torch_prefill(q, k, v, g, beta, state, idx, cu, h.Hv // h.Hk), 1, 0)
                row["torch_ref_tok_s"] = T / tr
                row["speedup_vs_torch_ref"] = tr / t
            rows.append(row)
            print_row(row, args)
    add_roofline(rows, peaks_before)
    if not args.json:
        print_roofline(rows)
    return rows


# ----------------------------------------------------------------------------- decode




DECODE_SPLIT_ENV = "VLLM_GDN_CPU_DECODE_SPLIT"  # auto | heads | vblocks | vblocks:C (kernels/common/decode_split.h)
DECODE_CLAIM_ENV = "VLLM_GDN_CPU_DECODE_CLAIM"  # auto | static | dynamic
# Decode also runs on a tensor-parallel shard: Qwen3-Next at TP=8 leaves 2 key / 4 value heads per
# rank, fewer heads than cores (the case the V-block split is for).
DECODE_MODELS = {**MODELS, "qwen3-next-tp8": HeadShape("qwen3-next-tp8", 2, 4, 128, 128)}


def _with_split(variant: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with the decode schedule `variant`, "SPLIT" or "SPLIT/CLAIM" (VLLM_GDN_CPU_DECODE_SPLIT,
    VLLM_GDN_CPU_DECODE_CLAIM; the kernel reads them on every call)."""
    split, _, claim = variant.partition("/")
    values = {DECODE_SPLIT_ENV: split, DECODE_CLAIM_ENV: claim or "auto"}

    def run():
        old = {name: os.environ.get(name) for name in values}
        os.environ.update(values)
        try:
            return fn()
        finally:
            for name, value in old.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return run


def _decode_inputs(B: int, Hk: int, Hv: int, K: int, V: int, dtype: torch.dtype, gen: torch.Generator):
    q = torch.randn(B, Hk, K, generator=gen).to(dtype)
    k = torch.randn(B, Hk, K, generator=gen).to(dtype)
    v = torch.randn(B, Hv, V, generator=gen).to(dtype)
    a, b = torch.randn(B, Hv, generator=gen).to(dtype), torch.randn(B, Hv, generator=gen).to(dtype)
    A_log, dt_bias = torch.zeros(Hv, dtype=dtype), torch.zeros(Hv, dtype=dtype)
    return q, k, v, a, b, A_log, dt_bias


def _mean_call_us(fn: Callable[[], object], calls: int, loops: int = 7) -> float:
    """Mean time of one call over a loop of `calls` calls, the best of `loops` loops (us)."""
    for _ in range(max(1, calls // 10)):
        fn()
    best = float("inf")
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def decode_fixed_costs(args, dtype: torch.dtype, sdt: torch.dtype) -> dict:
    """The fixed cost of one decode call through ops.fused_recurrent_gated_delta_rule, as the streamed
    rows call it, with a state too small to matter (K=8, V=16, in cache): `call_us` with one task
    (Python, dispatcher, argument checks; runs on the calling thread), `forkjoin_us` with one task per
    thread (the same plus at::parallel_for's fork/join over every thread)."""
    gen = torch.Generator().manual_seed(1)
    res = {}
    threads = torch.get_num_threads()
    for key, Hv in (("call_us", 1), ("forkjoin_us", threads)):
        q, k, v, a, b, A_log, dt_bias = _decode_inputs(1, 1, Hv, 8, 16, dtype, gen)
        state, idx, out = torch.zeros(1, Hv, 8, 16, dtype=sdt), torch.zeros(1, dtype=torch.int32), torch.empty_like(v)
        res[key] = _mean_call_us(
            lambda: ops.fused_recurrent_gated_delta_rule(q, k, v, A_log, dt_bias, a, b, state, idx, out=out),
            args.calls)
    return res


def bench_decode(args) -> list[dict]:
    """Decode over cold states: `layers` separate state pools stepped in turn, so every step reads
    and writes state that is not in cache (as in a real multi-layer model). Each row also says where
    the time goes: the fixed cost of a call with a tiny state (`forkjoin_us`, see decode_fixed_costs),
    the time the state's bytes take at the stream rate (`stream_floor_us`), and the rest
    (`other_us`); `warm_us` is the same call with its state in cache (one pool). With several
    --splits (VLLM_GDN_CPU_DECODE_SPLIT[/VLLM_GDN_CPU_DECODE_CLAIM] values) each is timed in turn,
    interleaved over rounds, one row each."""
    vl = None if args.no_vllm else vllm_ops()
    h = DECODE_MODELS[args.model]
    dtype = getattr(torch, args.dtype)
    splits = args.splits.split(",")
    bw = stream_gbps()
    rows = []
    gen = torch.Generator().manual_seed(0)
    fixed = {sdt: {sp: _with_split(sp, lambda: decode_fixed_costs(args, dtype, getattr(torch, sdt)))()
                   for sp in splits}
             for sdt in args.state_dtypes.split(",")}
    if not args.json:
        for sdt, per_split in fixed.items():
            for sp, f in per_split.items():
                print(f"# fixed cost per call, {sdt} state, split={sp}: one task {f['call_us']:.2f} us, "
                      f"one task per thread ({torch.get_num_threads()}) {f['forkjoin_us']:.2f} us", flush=True)
    for B in [int(x) for x in args.batches.split(",")]:
        q, k, v, a, b, A_log, dt_bias = _decode_inputs(B, h.Hk, h.Hv, h.K, h.V, dtype, gen)
        idx = torch.arange(B, dtype=torch.int32)
        cu = torch.arange(B + 1, dtype=torch.int32)
        out = torch.empty_like(v)
        for state_dtype_name in args.state_dtypes.split(","):
            sdt = getattr(torch, state_dtype_name)
            layer_bytes = B * h.Hv * h.K * h.V * sdt.itemsize
            # Enough pools that they cannot stay in the last-level cache between visits.
            layers = args.layers or max(12, -(-COLD_STATE_BYTES // layer_bytes))
            pools = [torch.zeros(B, h.Hv, h.K, h.V, dtype=sdt) for _ in range(layers)]
            state_bytes = 2 * B * h.Hv * h.K * h.V * pools[0].element_size()  # read + write per layer

            def ours():
                for pool in pools:
                    ops.fused_recurrent_gated_delta_rule(q, k, v, A_log, dt_bias, a, b, pool, idx, out=out)

            def ours_warm():
                ops.fused_recurrent_gated_delta_rule(q, k, v, A_log, dt_bias, a, b, pools[0], idx, out=out)

            # Each split's best over interleaved rounds (a noisy machine's drift reaches all alike).
            best = {sp: float("inf") for sp in splits}
            for _ in range(args.rounds if len(splits) > 1 else 1):
                for sp in splits:
                    best[sp] = min(best[sp], _with_split(sp, lambda: best_time(ours, args.repeat))())
            split_rows = []
            for sp in splits:
                row = {"model": args.model, "batch": B, "dtype": args.dtype, "state_dtype": state_dtype_name,
                       "split": sp, "layers": layers, "threads": torch.get_num_threads(), "stream_gbps": bw}
                t = best[sp] / layers
                row["ours_us_per_layer"] = t * 1e6
                row["ours_gbps"] = state_bytes / t / 1e9
                row["ours_pct_of_stream"] = 100 * row["ours_gbps"] / bw
                warm_calls = max(3, min(args.calls // 10, int(0.02 / t)))  # ~20 ms a loop
                row["warm_us"] = _with_split(sp, lambda: _mean_call_us(ours_warm, warm_calls, 5))()
                row["forkjoin_us"] = fixed[state_dtype_name][sp]["forkjoin_us"]
                row["stream_floor_us"] = state_bytes / bw / 1e3
                row["other_us"] = row["ours_us_per_layer"] - row["forkjoin_us"] - row["stream_floor_us"]
                split_rows.append(row)
            row, t = split_rows[0], best[splits[0]] / layers
            if vl is not None:
                dec_vllm = vl[1]

                def vllm():
                    for pool in pools:
                        dec_vllm(A_log, dt_bias, q[None], k[None], v[None], a, b, pool, idx, cu, True, 1.0, 20.0)

                try:
                    tv = best_time(vllm, args.repeat) / layers
                    row["vllm_us_per_layer"] = tv * 1e6
                    row["speedup_vs_vllm"] = tv / t
                except RuntimeError as e:  # e.g. a state dtype the built-in kernel refuses
                    row["vllm_error"] = str(e).splitlines()[0][:120]
            if not args.no_ref:
                def torch_ref():
                    for pool in pools[:2]:
                        reference.fused_recurrent_gated_delta_rule_ref(q, k, v, A_log, dt_bias, a, b, pool, idx)

                tr = best_time(torch_ref, 1, 0) / 2
                row["torch_ref_us_per_layer"] = tr * 1e6
                row["speedup_vs_torch_ref"] = tr / t
            for row in split_rows:
                rows.append(row)
                print_row(row, args)
    return rows


# ----------------------------------------------------------------------------- output


def print_row(row: dict, args) -> None:
    if args.json:
        return
    parts = []
    for key, val in row.items():
        parts.append(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}")
    print("  ".join(parts), flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_gdn_cpu.tools.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document at the end")
    common.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    common.add_argument("--repeat", type=int, default=5)
    common.add_argument("--no-vllm", action="store_true", help="skip vLLM's built-in ops")
    common.add_argument("--no-ref", action="store_true", help="skip the plain-torch reference")
    common.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])

    p = sub.add_parser("prefill", parents=[common], help="chunked prefill, tokens/s per layer")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--workloads", default=",".join(PREFILL_WORKLOADS))
    p.add_argument("--ref-max-tokens", type=int, default=2048, help="skip the slow torch reference above this")
    p.add_argument("--gemms", default="",
                   help="comma-separated GEMM paths (VLLM_GDN_CPU_GEMM values) to time ours on, interleaved; "
                        "the first is reported as ours, with its speed-up over each other")
    p.add_argument("--heads", default="",
                   help="comma-separated head counts H: one shape per H (Hk = Hv = H, K = V = 128, a tensor-parallel "
                        "shard) instead of --models, e.g. --heads 1,4,8 --workloads T8192")
    p.add_argument("--schedules", default="",
                   help="comma-separated VLLM_GDN_CPU_PREFILL_SCHEDULE values (auto, sequential, chunk_parallel) to "
                        "time ours under, interleaved (with --gemms: every path x schedule); the first is ours; each "
                        "may add +NAME=VALUE environment settings, e.g. chunk_parallel+VLLM_GDN_CPU_ISA=avx512")
    p.add_argument("--phases", action="store_true",
                   help="also print where the chunk-parallel schedule's time goes in each configuration that runs it "
                        "(per-phase timers, VLLM_GDN_CPU_PREFILL_PHASES=1, in separate calls after the timed ones)")
    p.add_argument("--scaling", action="store_true",
                   help="also time each configuration on one thread, interleaved: all-threads / one-thread speed-up "
                        "and its %% of the scaling ceiling measured in the same run (bench roofline's core_scaling)")

    d = sub.add_parser("decode", parents=[common], help="decode step over cold states")
    d.add_argument("--model", default="qwen3-next", choices=list(DECODE_MODELS))
    d.add_argument("--batches", default="1,16,64")
    d.add_argument("--layers", type=int, default=0,
                   help="state pools stepped in turn (default: at least 12 and 512 MiB of state)")
    d.add_argument("--state-dtypes", default="float32,bfloat16")
    d.add_argument("--splits", default="auto",
                   help="comma-separated decode schedules timed in turn, interleaved: VLLM_GDN_CPU_DECODE_SPLIT "
                        "values (auto, heads, vblocks, vblocks:C), each optionally /static or /dynamic "
                        "(VLLM_GDN_CPU_DECODE_CLAIM); the first gets the vLLM / reference columns")
    d.add_argument("--rounds", type=int, default=3, help="interleaved rounds with several --splits")
    d.add_argument("--calls", type=int, default=2000, help="calls per timed loop of the fixed-cost rows")

    sub.add_parser("roofline", parents=[common],
                   help="measured GEMM peaks, stream bandwidth, per-core GEMM rate alone and with all cores busy")
    from vllm_gdn_cpu.tools.bench_overhead import add_parser as add_overhead_parser, bench_overhead
    from vllm_gdn_cpu.tools.bench_e2e import add_parser as add_e2e_parser, bench_e2e

    add_overhead_parser(sub, common)
    add_e2e_parser(sub, common)
    from vllm_gdn_cpu.tools import bench_mamba2

    bench_mamba2.add_parsers(sub, common)
    from vllm_gdn_cpu.tools import bench_kda

    bench_kda.add_parsers(sub, common)
    from vllm_gdn_cpu.tools import bench_mamba1

    bench_mamba1.add_parsers(sub, common)
    from vllm_gdn_cpu.tools import bench_gemv

    bench_gemv.add_parser(sub, common)
    from vllm_gdn_cpu.tools import bench_mtp

    bench_mtp.add_parser(sub, common)

    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = {"runtime": ops.runtime_info(), "torch": torch.__version__}
    if not args.json:
        print(f"# vllm_gdn_cpu bench {args.mode}: {info}", flush=True)
    if args.mode == "prefill":
        rows = bench_prefill(args)
    elif args.mode == "decode":
        rows = bench_decode(args)
    elif args.mode == "overhead":
        rows = bench_overhead(args)
    elif args.mode == "e2e":
        rows = bench_e2e(args)
    elif args.mode.startswith("mamba2-"):
        rows = bench_mamba2.run(args)
    elif args.mode.startswith("kda-"):
        rows = bench_kda.run(args)
    elif args.mode.startswith("mamba1-"):
        rows = bench_mamba1.run(args)
    elif args.mode == "gemv":
        rows = bench_gemv.bench_gemv(args)
    elif args.mode == "mtp":
        rows = bench_mtp.bench_mtp(args)
    else:
        threads = torch.get_num_threads()
        rows = [{**gemm_peaks(), "stream_gbps": stream_gbps(), "threads": threads, **core_scaling(threads)}]
        print_row(rows[0], args)
    if args.json:
        json.dump({"mode": args.mode, **info, "rows": rows}, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
