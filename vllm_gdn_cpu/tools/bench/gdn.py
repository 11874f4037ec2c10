"""GDN (gated delta rule) kernel benchmarks: ours vs vLLM's built-in CPU ops vs a plain-torch reference.

    python -m vllm_gdn_cpu.tools.bench prefill [--models qwen3-next,...] [--workloads T512,...] [--json]
    python -m vllm_gdn_cpu.tools.bench prefill --heads 1,4,8 --workloads T8192 --scaling [--schedules auto,sequential]
    python -m vllm_gdn_cpu.tools.bench decode  [--batches 1,16,64] [--splits auto,heads] [--layers N] [--json]

Prefill: ``chunk_gated_delta_rule`` vs vLLM's ``chunk_gated_delta_rule_cpu`` (bf16 inputs) vs the
chunked torch reference; GFLOP/s of the chunked algorithm and its % of the GEMM peak of the dtype the
path multiplies in (harness.add_roofline). Decode: ``fused_recurrent_gated_delta_rule`` vs vLLM's
``fused_sigmoid_gating_delta_rule_update_cpu`` over cold state pools, GB/s and % of the stream.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from vllm_gdn_cpu import ops, reference
from vllm_gdn_cpu.tools.bench.harness import (
    COLD_STATE_BYTES,
    CPU_TIME_HELP,
    add_decay_ratios,
    add_decays_argument,
    add_roofline,
    best_cpu_time_1t,
    best_time,
    core_scaling,
    cpu_time_cold_decode,
    decay_columns,
    decay_spread,
    gemm_peaks,
    matmul_peak_1t,
    mean_call_us,
    path_uses_bf16_products,
    print_decay_ratios,
    print_roofline,
    print_row,
    random_states,
    stream_gbps,
)

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


def gate_params(Hv: int, decays: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A_log and dt_bias [Hv] (fp32) for a --decays value. Realistic: A_log = linspace(-2, 1) and
    dt_bias = linspace(-1, 1) over the heads, which with a, b ~ N(0, 1) give per-token decays
    g = -exp(A_log) softplus(a + dt_bias) of about -0.04 to -5 nats, as trained Qwen3-Next heads
    reach; strong: every head at A_log = dt_bias = 1; benign: A_log -4..-3, dt_bias -2..-1 (about
    -0.01 nats: a chunk's cumulative decays stay within a few nats)."""
    return (decay_spread(decays, Hv, realistic=(-2.0, 1.0), benign=(-4.0, -3.0)),
            decay_spread(decays, Hv, realistic=(-1.0, 1.0), benign=(-2.0, -1.0)))


def prefill_inputs(h: HeadShape, seqlens: list[int], dtype: torch.dtype, decays: str = "realistic"):
    """Inputs of one prefill call: gates of the --decays distribution (gate_params), states of
    realistic scale (harness.random_states)."""
    T, N = sum(seqlens), len(seqlens)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(T, h.Hk, h.K, generator=gen).to(dtype)
    k = torch.randn(T, h.Hk, h.K, generator=gen).to(dtype)
    v = torch.randn(T, h.Hv, h.V, generator=gen).to(dtype)
    A_log, dt_bias = gate_params(h.Hv, decays)
    g, beta = ops.gdn_gating(A_log, torch.randn(T, h.Hv, generator=gen), torch.randn(T, h.Hv, generator=gen), dt_bias)
    state = random_states((N, h.Hv, h.K, h.V), torch.float32, gen)
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
        for wl, decays in itertools.product(args.workloads.split(","), args.decays):
            seqlens = PREFILL_WORKLOADS[wl]
            T = sum(seqlens)
            q, k, v, g, beta, state, idx, cu = prefill_inputs(h, seqlens, dtype, decays)
            out = torch.empty_like(v)
            gemm = paths[0]
            bf16_products = dtype == torch.bfloat16 and path_uses_bf16_products(gemm)
            row = {"model": model, "workload": wl, "tokens": T, "dtype": args.dtype, "threads": threads,
                   "gemm": gemm or ops.runtime_info()["gemm"], "gemm_products": "bf16" if bf16_products else "fp32",
                   **decay_columns(decays, -g)}
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
            if args.cpu_time:  # one thread, CPU time: robust to a loaded machine
                t1 = best_cpu_time_1t(ours, args.repeat)
                peak_1t = matmul_peak_1t(torch.bfloat16 if bf16_products else torch.float32)
                row["ours_1t_cpu_gflops"] = flops / t1 / 1e9
                row["matmul_1t_cpu_gflops"] = peak_1t
                row["ours_1t_pct_of_matmul"] = 100 * row["ours_1t_cpu_gflops"] / peak_1t
                if "vllm_tok_s" in row:
                    tv1 = best_cpu_time_1t(lambda: chunk_vllm(*args_v), args.repeat)
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


def _decode_inputs(B: int, Hk: int, Hv: int, K: int, V: int, dtype: torch.dtype, gen: torch.Generator,
                   decays: str = "realistic"):
    q = torch.randn(B, Hk, K, generator=gen).to(dtype)
    k = torch.randn(B, Hk, K, generator=gen).to(dtype)
    v = torch.randn(B, Hv, V, generator=gen).to(dtype)
    a, b = torch.randn(B, Hv, generator=gen).to(dtype), torch.randn(B, Hv, generator=gen).to(dtype)
    A_log, dt_bias = (p.to(dtype) for p in gate_params(Hv, decays))
    return q, k, v, a, b, A_log, dt_bias


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
        res[key] = mean_call_us(
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
    for B, decays in itertools.product([int(x) for x in args.batches.split(",")], args.decays):
        q, k, v, a, b, A_log, dt_bias = _decode_inputs(B, h.Hk, h.Hv, h.K, h.V, dtype, gen, decays)
        decay_cols = decay_columns(decays, -ops.gdn_gating(A_log.float(), a, b, dt_bias.float())[0])
        idx = torch.arange(B, dtype=torch.int32)
        cu = torch.arange(B + 1, dtype=torch.int32)
        out = torch.empty_like(v)
        for state_dtype_name in args.state_dtypes.split(","):
            sdt = getattr(torch, state_dtype_name)
            layer_bytes = B * h.Hv * h.K * h.V * sdt.itemsize
            # Enough pools that they cannot stay in the last-level cache between visits.
            layers = args.layers or max(12, -(-COLD_STATE_BYTES // layer_bytes))
            first = random_states((B, h.Hv, h.K, h.V), sdt, torch.Generator().manual_seed(2))
            pools = [first] + [first.clone() for _ in range(layers - 1)]  # states of realistic scale
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
                       "split": sp, "layers": layers, "threads": torch.get_num_threads(), "stream_gbps": bw,
                       **decay_cols}
                t = best[sp] / layers
                row["ours_us_per_layer"] = t * 1e6
                row["ours_gbps"] = state_bytes / t / 1e9
                row["ours_pct_of_stream"] = 100 * row["ours_gbps"] / bw
                warm_calls = max(3, min(args.calls // 10, int(0.02 / t)))  # ~20 ms a loop
                row["warm_us"] = _with_split(sp, lambda: mean_call_us(ours_warm, warm_calls, 5))()
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
            if args.cpu_time:  # one thread, CPU time, vs stream_scale_ over as many bytes (first split)
                t1 = _with_split(splits[0], lambda: cpu_time_cold_decode(row, ours, layers, state_bytes, args.repeat))()
                if "vllm_us_per_layer" in row:
                    tv1 = best_cpu_time_1t(vllm, args.repeat) / layers
                    row["vllm_1t_cpu_us_per_layer"] = tv1 * 1e6
                    row["speedup_vs_vllm_1t_cpu"] = tv1 / t1
            for row in split_rows:
                rows.append(row)
                print_row(row, args)
    add_decay_ratios(rows, ("model", "batch", "state_dtype", "split"))
    print_decay_ratios(rows, ("model", "batch", "state_dtype", "split"), args)
    return rows


# ----------------------------------------------------------------------------- options


def add_parsers(sub, common) -> None:
    p = sub.add_parser("prefill", parents=[common], help="chunked prefill, tokens/s per layer")
    p.set_defaults(run=bench_prefill)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--workloads", default=",".join(PREFILL_WORKLOADS))
    p.add_argument("--ref-max-tokens", type=int, default=2048, help="skip the slow torch reference above this")
    add_decays_argument(p)
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
    p.add_argument("--cpu-time", action="store_true", help=CPU_TIME_HELP)

    d = sub.add_parser("decode", parents=[common], help="decode step over cold states")
    d.set_defaults(run=bench_decode)
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
    d.add_argument("--cpu-time", action="store_true", help=CPU_TIME_HELP)
    add_decays_argument(d)
