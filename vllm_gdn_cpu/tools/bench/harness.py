"""The measuring harness every bench module shares: timers, the limits a figure is a percentage of
(GEMM peaks, stream bandwidth, per-core scaling), cold state pools, decay distributions, row output.

It imports nothing from the bench modules (tests/test_bench_imports.py checks it): each bench module
(gdn, mamba2, mamba1, kda, gemv, e2e, mtp, overhead, mamba2_layer, roofline) imports this module,
``vllm_gdn_cpu.ops`` and ``vllm_gdn_cpu.reference`` (the in-vLLM benches also ``models`` and vLLM
itself), never another bench module; ``__main__`` is the one registry of subcommands.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Iterable, Optional

import torch

from vllm_gdn_cpu import ops

# ----------------------------------------------------------------------------- timers


def best_time(fn: Callable[[], object], repeat: int, min_time: float = 0.2, max_time: float = 60.0) -> float:
    """Best wall time of fn() over `repeat` timed runs (after one warm-up), at least min_time total;
    once the timed runs took max_time seconds, no more start (a slow case stays bounded)."""
    fn()
    best, total, n = float("inf"), 0.0, 0
    while (n < repeat or total < min_time) and not (n and total >= max_time):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, total, n = min(best, dt), total + dt, n + 1
        if n >= 50 * repeat:
            break
    return best



def mean_call_us(fn: Callable[[], object], calls: int, loops: int = 7) -> float:
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



def best_cpu_time_1t(fn, repeat: int) -> float:
    """Best CPU time of fn() on one torch thread (time.thread_time of the calling thread, which runs
    a one-thread parallel region itself), after one warm-up. On a shared machine this, unlike wall
    time, does not count the time the thread waits for a core; caches and memory stay shared."""
    saved = torch.get_num_threads()
    torch._C.set_num_threads(1)  # torch._C's: an in-process vLLM worker disables torch.set_num_threads
    try:
        fn()
        best = float("inf")
        for _ in range(repeat):
            t0 = time.thread_time()
            fn()
            best = min(best, time.thread_time() - t0)
        return best
    finally:
        torch._C.set_num_threads(saved)


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



def gemm_peaks() -> dict:
    return {"bf16_gemm_gflops": gemm_peak_gflops(torch.bfloat16), "fp32_gemm_gflops": gemm_peak_gflops(torch.float32)}



def matmul_peak_1t(dtype: torch.dtype, n: int = 1024, repeat: int = 5) -> float:
    """GFLOP/s of torch's n x n matmul in dtype on one thread, by CPU time (best_cpu_time_1t)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / best_cpu_time_1t(lambda: torch.matmul(a, b), repeat) / 1e9



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


# ----------------------------------------------------------------------------- decode over cold states


def cold_state_pools(batch: int, slot_shape: tuple, state_dtype: torch.dtype, layers: int | None):
    """State pools for a decode benchmark over cold states: `layers` pools (by default as many as
    exceed COLD_STATE_BYTES, at least 8) of batch + 1 slots of `slot_shape` (slot 0: vLLM's null
    block, never named), holding states of realistic scale (random_states; every pool a copy of the
    first). Returns (pools, bytes one decode of the batch moves per pool: each state read and
    written once)."""
    numel = 1
    for n in slot_shape:
        numel *= n
    layer_bytes = (batch + 1) * numel * state_dtype.itemsize
    layers = layers or max(8, -(-COLD_STATE_BYTES // layer_bytes))
    first = random_states((batch + 1, *slot_shape), state_dtype, torch.Generator().manual_seed(2))
    pools = [first] + [first.clone() for _ in range(layers - 1)]
    return pools, 2 * batch * numel * state_dtype.itemsize



def time_cold_decode(row: dict, ours, layers: int, moved: int, bw: float, repeat: int) -> float:
    """Times ours() (one call per pool) into row: per layer, GB/s moved, % of the stream `bw`.
    Returns the time per layer."""
    t = best_time(ours, repeat) / layers
    row["ours_us_per_layer"] = t * 1e6
    row["ours_gbps"] = moved / t / 1e9
    row["ours_pct_of_stream"] = 100 * row["ours_gbps"] / bw
    return t



def cpu_time_cold_decode(row: dict, ours, layers: int, moved: int, repeat: int) -> float:
    """ours() on one thread by CPU time against stream_scale_ over as many bytes, into row. Returns
    ours' one-thread CPU time per layer."""
    flat = [torch.zeros(moved // 8) for _ in range(layers)]
    t1 = best_cpu_time_1t(ours, repeat) / layers
    ts1 = best_cpu_time_1t(lambda: [ops.stream_scale_(f, 1.0) for f in flat], repeat) / layers
    row["ours_1t_cpu_gbps"] = moved / t1 / 1e9
    row["stream_1t_cpu_gbps"] = moved / ts1 / 1e9
    row["ours_1t_pct_of_stream"] = 100 * ts1 / t1
    return t1


# ----------------------------------------------------------------------------- output and options


def print_row(row: dict, args) -> None:
    """One row as key=value pairs (nothing with --json: the rows then go out as one document)."""
    if args.json:
        return
    parts = []
    for key, val in row.items():
        parts.append(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}")
    print("  ".join(parts), flush=True)



CPU_TIME_HELP = ("also time ours (and vLLM's) on one thread by CPU time (time.thread_time) against the same "
                 "limit measured the same way: figures that a loaded machine does not distort as much")



def common_parser() -> argparse.ArgumentParser:
    """The options every subcommand takes (its parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document at the end")
    common.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    common.add_argument("--repeat", type=int, default=5)
    common.add_argument("--no-vllm", action="store_true", help="skip vLLM's built-in ops")
    common.add_argument("--no-ref", action="store_true", help="skip the plain-torch reference")
    common.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    return common


# ----------------------------------------------------------------------------- value distributions


# What --decays selects. Trained checkpoints spread their heads' (channels') decay rates from weak to
# strong: e.g. Qwen3-Next's GDN gates reach per-token decays of about -0.04 to -5 nats, and a
# 64-token chunk of a strong head then accumulates several hundred nats, far past fp32's smallest
# normal number (e^-87): the cumulative decays inside a chunk are denormal or zero there.
DECAYS = {
    "realistic": "per-head decay rates spread from weak to strong, as trained checkpoints have them",
    "benign": "every head weak: a chunk's cumulative decays stay far from fp32's denormal range",
    "strong": "every head at the strong end of the realistic spread",
}
DECAYS_HELP = ("comma list of decay distributions, each case timed under each, in order, with a time-ratio "
               "column against the first (ours_time_vs_<first> = this time / the first's): realistic (default: "
               "per-head decays spread weak to strong, as trained checkpoints), benign (weak decays only, "
               "never near fp32's denormal range), strong (every head at the strong end)")
STATE_SCALE = 0.1  # initial states: N(0, STATE_SCALE^2), the scale of a trained model's states


def add_decays_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decays", default="realistic", type=decays_list, help=DECAYS_HELP)


def decays_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if name not in DECAYS]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--decays takes a comma list of distinct names of {', '.join(DECAYS)}; "
                                         f"got {text!r}")
    return names


def decay_spread(decays: str, n: int, realistic: tuple[float, float], benign: tuple[float, float]) -> torch.Tensor:
    """n per-head (per-channel) values of a parameter that sets decay rates, as fp32: linspace from the
    weak end realistic[0] to the strong end realistic[1] ("realistic"), every value at the strong end
    ("strong"), or linspace over `benign` ("benign")."""
    if decays == "realistic":
        return torch.linspace(realistic[0], realistic[1], n)
    if decays == "strong":
        return torch.full((n,), float(realistic[1]))
    if decays == "benign":
        return torch.linspace(benign[0], benign[1], n)
    raise ValueError(f"decays must be one of {', '.join(DECAYS)}; got {decays!r}")


def decay_columns(decays: str, nats: torch.Tensor) -> dict:
    """Row columns naming the distribution and the per-token decays (nats, > 0) it gave: 1st and 99th
    percentile over every token and head (channel)."""
    flat = nats.detach().float().flatten()
    flat = flat[:: -(-flat.numel() // (1 << 20))]  # at most ~1M samples (torch.quantile's limit is 16M)
    lo, hi = torch.quantile(flat, torch.tensor([0.01, 0.99])).tolist()
    return {"decays": decays, "decay_nats_p1": lo, "decay_nats_p99": hi}


def random_states(shape: tuple, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Initial states of realistic scale (N(0, STATE_SCALE^2)) rather than zeros."""
    return (STATE_SCALE * torch.randn(*shape, generator=gen)).to(dtype)


# (label, row key, whether higher is faster): the figures add_decay_ratios compares.
DECAY_RATIO_KEYS = (
    ("ours", "ours_tok_s", True), ("vllm", "vllm_tok_s", True), ("torch_ref", "torch_ref_tok_s", True),
    ("ours_1t_cpu", "ours_1t_cpu_gflops", True), ("ours_1t_cpu", "ours_1t_cpu_tok_s", True),
    ("ours", "ours_us_per_layer", False), ("vllm", "vllm_us_per_layer", False),
    ("torch_ref", "torch_ref_us_per_layer", False), ("ours_1t_cpu", "ours_1t_cpu_gbps", True),
    ("vllm_1t_cpu", "vllm_1t_cpu_tok_s", True), ("vllm_1t_cpu", "vllm_1t_cpu_us_per_layer", False),
)


def add_decay_ratios(rows: list[dict], case_keys: Iterable[str]) -> None:
    """Rows of several --decays values: the rows of one case (equal in every `case_keys` field) are
    compared with the case's first row (the first --decays value): every later row gets
    <label>_time_vs_<first decays> = its time / the first row's time, for ours, vLLM's, the torch
    reference and the one-thread CPU-time figures where both rows have them (> 1: slower)."""
    first: dict = {}
    for row in rows:
        case = tuple(row.get(key) for key in case_keys)
        base = first.setdefault(case, row)
        if base is row or base["decays"] == row["decays"]:
            continue
        for label, key, higher_is_faster in DECAY_RATIO_KEYS:
            name = f"{label}_time_vs_{base['decays']}"
            if key in row and key in base and name not in row:
                row[name] = base[key] / row[key] if higher_is_faster else row[key] / base[key]


def print_decay_ratios(rows: list[dict], case_keys: Iterable[str], args) -> None:
    """After add_decay_ratios, one line per compared row: its case, its decays, each time ratio."""
    if args.json:
        return
    for row in rows:
        ratios = {k: v for k, v in row.items() if "_time_vs_" in k}
        if ratios:
            case = " ".join(f"{k}={row[k]}" for k in case_keys if k in row)
            print(f"# decays {row['decays']} vs {next(iter(ratios)).rsplit('_vs_', 1)[1]}, {case}: "
                  + ", ".join(f"{k.split('_time_vs_')[0]} {v:.2f}x" for k, v in ratios.items()), flush=True)


def add_state_family_parsers(sub, common, family: str, *, models, default_models: str, prefill_run, decode_run,
                             prefill_help: str, decode_help: str, workloads, batches: str = "1,16") -> None:
    """The `<family>-prefill` and `<family>-decode` subcommands of a recurrent-state family's bench
    (Mamba2, Mamba-1, KDA): the same options for each, the family's models, workloads and runs."""
    p = sub.add_parser(f"{family}-prefill", parents=[common], help=prefill_help)
    p.set_defaults(run=prefill_run)
    p.add_argument("--models", default=default_models, help=f"of {', '.join(models)}")
    p.add_argument("--workloads", default="T2048,8x256", help=f"of {', '.join(workloads)}")
    p.add_argument("--ref-max-tokens", type=int, default=2048, help="skip the slow torch reference above this")
    p.add_argument("--cpu-time", action="store_true", help=CPU_TIME_HELP)
    add_decays_argument(p)
    d = sub.add_parser(f"{family}-decode", parents=[common], help=decode_help)
    d.set_defaults(run=decode_run)
    d.add_argument("--models", default=default_models, help=f"of {', '.join(models)}")
    d.add_argument("--batches", default=batches)
    d.add_argument("--layers", type=int, default=0,
                   help="state pools stepped in turn (default: at least 8 and 512 MiB of state)")
    d.add_argument("--state-dtypes", default="float32,bfloat16")
    d.add_argument("--cpu-time", action="store_true", help=CPU_TIME_HELP)
    add_decays_argument(d)
