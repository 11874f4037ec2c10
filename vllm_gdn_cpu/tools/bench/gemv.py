"""Small-batch projections (``ops.small_linear``) against the memory roofline, side by side with
vLLM's CPU GEMM (``_custom_ops.onednn_mm``, what its linear layers run on CPU) and torch's F.linear.

    python -m vllm_gdn_cpu.tools.bench gemv [--shapes 12352x1024,1024x4096,64x1024] [--ms 1,4,16]
                                            [--weight-dtypes float32,bfloat16] [--cpu-time] [--json]

Each row is one weight shape [N, K], weight dtype and token count M (x and out in the weight's
dtype, as in a model). Weights are cold: every timed pass walks a pool of distinct weights larger
than three times the last-level cache the kernel reports (harness.COLD_STATE_BYTES), one call per
weight, as a model's layers do; GB/s counts the weight bytes read once per call, and % is of the
in-place stream bandwidth measured in the same run (harness.stream_gbps, which counts its read and
its write) and of the read-only bandwidth (``read_gbps``: a projection only reads its weights). The implementations' passes alternate (best of --repeat rounds), so drift on a loaded
machine reaches all of them alike. vLLM's handlers are built the way its CPU linear layers build
them (``create_onednn_mm(weight.t())``, one per weight of the pool, their packed copies included).
With ``--cpu-time`` each row also gets one-thread figures by CPU time (ours, torch's, vLLM's, and
the stream probe over as many bytes), which a shared machine distorts far less than wall time.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from vllm_gdn_cpu import ops
from vllm_gdn_cpu.tools.bench.harness import COLD_STATE_BYTES, best_time, print_row, stream_gbps

DEFAULT_SHAPES = "12352x1024,1024x4096,64x1024"  # Qwen3-Next qkvz+ba fused, out_proj, ba (hidden 1024)


def _vllm_onednn():
    """vLLM's (create_onednn_mm, onednn_mm), or None when vLLM or its oneDNN GEMM is not here."""
    try:
        from vllm import _custom_ops as vops

        if not getattr(vops, "_supports_onednn", False):
            return None
        return vops.create_onednn_mm, vops.onednn_mm
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return None


def _best_pass(fn, n_calls: int, clock) -> float:
    t0 = clock()
    for i in range(n_calls):
        fn(i)
    return clock() - t0


def _time_side_by_side(fns: dict, n_calls: int, repeat: int, clock=time.perf_counter) -> dict:
    """Best time of one pass (n_calls calls, fn(i) for i in order) per implementation, the
    implementations' passes interleaved over `repeat` rounds after one warm-up pass each."""
    for fn in fns.values():
        _best_pass(fn, n_calls, clock)
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            best[name] = min(best[name], _best_pass(fn, n_calls, clock))
    return best


def _one_thread(fn):
    def run():
        saved = torch.get_num_threads()
        torch._C.set_num_threads(1)
        try:
            return fn()
        finally:
            torch._C.set_num_threads(saved)

    return run


def read_gbps(repeat: int = 3) -> float:
    """Read-only bandwidth: the better of torch's sum and dot (x with itself: each line read once)
    over a cold fp32 buffer as large as the weight pools. A projection only reads its weights, while
    the in-place stream probe counts its reads and its writes; on the 2-core VM measured a pure read
    moved about half the in-place figure's bytes (sum 24, dot 27 of an in-place 53 GB/s)."""
    x = torch.ones(COLD_STATE_BYTES // 4)
    t = min(best_time(lambda: x.sum(), repeat), best_time(lambda: torch.dot(x, x), repeat))
    return x.numel() * 4 / t / 1e9


QUANTIZED = ("int8", "int4")
INT4_GROUP = 128


def _vllm_int4():
    """vLLM's W4A16 CPU GEMM (CPUWNA16LinearKernel: cpu_gemm_wna16, isa hint "vec" without AMX) and
    its weight layout (GPTQ-style uint4b8 repacked as its process_weights_after_loading does), or
    None where not available."""
    try:
        from vllm import _custom_ops as vops
        from vllm.model_executor.layers.quantization.utils.quant_utils import pack_quantized_values_into_int32
        from vllm.scalar_type import scalar_types

        def make(q_kn: torch.Tensor) -> torch.Tensor:  # q_kn: [K, N] stored values 0..15
            K = q_kn.shape[0]
            w = pack_quantized_values_into_int32(q_kn, scalar_types.uint4b8, 1)
            return w.view(K, -1, 2).permute(1, 0, 2).reshape(-1, K * 2).contiguous()

        def run(w, scales, x):
            isa = "amx" if torch.cpu._is_amx_tile_supported() and x.dtype == torch.bfloat16 else "vec"
            return vops.cpu_gemm_wna16(input=x, q_weight=w, scales=scales, zeros=None, bias=None,
                                       pack_factor=8, isa_hint=isa)

        return make, run
    except Exception:  # noqa: BLE001
        return None


def _int4_rows(args, shapes, ms, bw, read_bw) -> list[dict]:
    """int4 weight rows (symmetric uint4b8, scales per 128 inputs in x's dtype): vLLM's W4A16 GEMM
    vs torch's F.linear on a dequantized copy. Ours: no int4 kernel yet (not measured). GB/s count
    the 4-bit weights and their scales."""
    xdtype = getattr(torch, args.x_dtype)
    vl = None if args.no_vllm else _vllm_int4()
    rows = []
    for N, K in shapes:
        qbytes = N * K // 2 + N * (K // INT4_GROUP) * xdtype.itemsize
        count = max(2, COLD_STATE_BYTES // qbytes)
        gen = torch.Generator().manual_seed(N + K)
        row_err = None
        if vl is not None:
            try:
                one = vl[0](torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32))
                ws = one.unsqueeze(0).expand(count, *one.shape).clone()
                scales = (torch.rand(K // INT4_GROUP, N, generator=gen) * 0.01).to(xdtype)
                scales = scales.unsqueeze(0).expand(count, *scales.shape).clone()
            except RuntimeError as e:
                row_err, ws = str(e).splitlines()[0][:120], None
        dq_count = max(2, COLD_STATE_BYTES // (N * K * xdtype.itemsize))
        dq = (torch.randn(N, K, generator=gen) * 0.01).to(xdtype).expand(dq_count, N, K).clone()
        for M in ms:
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(xdtype)
            row = {"N": N, "K": K, "M": M, "weight_dtype": "int4", "group": INT4_GROUP, "x_dtype": args.x_dtype,
                   "threads": torch.get_num_threads(), "isa": ops.runtime_info()["isa"], "ours": "no int4 kernel",
                   "stream_gbps": bw, "read_gbps": read_bw}
            fns = {}
            if vl is not None and ws is not None:
                fns["vllm"] = lambda i: vl[1](ws[i], scales[i], x)
                t = _time_side_by_side(fns, count, args.repeat)["vllm"]
                row.update(vllm_us=t / count * 1e6, vllm_gbps=qbytes * count / t / 1e9)
                row["vllm_pct_of_read"] = 100 * row["vllm_gbps"] / read_bw
            t_dq = _time_side_by_side({"d": lambda i: F.linear(x, dq[i])}, dq_count, args.repeat)["d"]
            row["torch_dequantized_us"] = t_dq / dq_count * 1e6
            if "vllm_us" in row:
                row["vllm_speedup_vs_torch_dequantized"] = row["torch_dequantized_us"] / row["vllm_us"]
            if args.cpu_time and fns:
                stream_buf = torch.ones(max(count * qbytes, COLD_STATE_BYTES) // 4)
                fns1 = {**fns, "stream": lambda i: ops.stream_scale_(stream_buf, 1.0) if i == 0 else None}
                t1 = _one_thread(lambda: _time_side_by_side(fns1, count, args.repeat, time.thread_time))()
                row["stream_1t_cpu_gbps"] = 2 * stream_buf.numel() * 4 / t1.pop("stream") / 1e9
                row["vllm_1t_cpu_gbps"] = qbytes * count / t1["vllm"] / 1e9
                row["vllm_1t_pct_of_stream"] = 100 * row["vllm_1t_cpu_gbps"] / row["stream_1t_cpu_gbps"]
                del stream_buf
            if row_err:
                row["vllm_error"] = row_err
            rows.append(row)
            print_row(row, args)
        del dq
    return rows


def _vllm_int8():
    """vLLM's W8A8 int8 CPU GEMM as its CPUInt8ScaledMMLinearKernel runs it without AMX (oneDNN:
    create_onednn_scaled_mm on the [K, N] weight with per-channel scales, dynamic symmetric
    per-token activation quantization per call), or None when not available here."""
    try:
        from vllm import _custom_ops as vops

        if not getattr(vops, "_supports_onednn", False):
            return None

        def make(q, scale, out_dtype):
            return vops.create_onednn_scaled_mm(q.t(), scale, out_dtype, True, False, 32)

        def run(handler, x, out):
            x_q, x_s, x_zp = vops.onednn_scaled_int8_quant(x, None, None, True)
            vops.onednn_scaled_mm(handler, x_q, out, x_s, x_zp, None, None)
            return out

        return make, run
    except Exception:  # noqa: BLE001
        return None


def _quantized_rows(args, wname, shapes, ms, bw, read_bw) -> list[dict]:
    """int8 weight rows: [N, K] int8 with fp32 per-row scales, x in --x-dtype; ours
    (ops.linear_int8, weight-only) vs vLLM's W8A8 int8 GEMM (_vllm_int8) vs torch's F.linear on a
    dequantized copy in x's dtype (what a dequantize-at-load fallback would stream: 2-4x the
    bytes). GB/s and % count the int8 bytes (plus the scales) read once per call."""
    xdtype = getattr(torch, args.x_dtype)
    vl = None if args.no_vllm else _vllm_int8()
    rows = []
    for N, K in shapes:
        qbytes = N * K + N * 4
        count = max(2, COLD_STATE_BYTES // qbytes)
        gen = torch.Generator().manual_seed(N + K)
        # one random weight copied over the pool (drawing ~0.5 GB of random numbers takes longer
        # than the timing; distinct buffers are what keeps the weights cold)
        qs = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).expand(count, N, K).clone()
        scales = torch.rand(count, N, generator=gen) * 0.01 + 1e-3
        handlers = None
        if vl is not None:
            try:
                handlers = [vl[0](qs[i], scales[i].reshape(N, 1), xdtype) for i in range(count)]
            except RuntimeError as e:
                handlers = str(e).splitlines()[0][:120]
        # the dequantized fallback: a pool of its own, as cold (fewer, larger weights)
        dq_count = max(2, COLD_STATE_BYTES // (N * K * xdtype.itemsize))
        dq = (torch.randn(N, K, generator=gen) * 0.01).to(xdtype).expand(dq_count, N, K).clone()
        for M in ms:
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(xdtype)
            out = torch.empty(M, N, dtype=xdtype)
            fns = {"ours": lambda i: ops.linear_int8(x, qs[i], scales[i])}
            if isinstance(handlers, list):
                fns["vllm"] = lambda i: vl[1](handlers[i], x, out)
            times = _time_side_by_side(fns, count, args.repeat)
            t_dq = _time_side_by_side({"torch_dequantized": lambda i: F.linear(x, dq[i])}, dq_count, args.repeat)
            row = {"N": N, "K": K, "M": M, "weight_dtype": wname, "x_dtype": args.x_dtype,
                   "threads": torch.get_num_threads(), "isa": ops.runtime_info()["isa"],
                   "pool_weights": count, "pool_mib": count * qbytes / 2**20, "stream_gbps": bw,
                   "read_gbps": read_bw}
            for name, t in times.items():
                gbps = qbytes * count / t / 1e9
                row[f"{name}_us"] = t / count * 1e6
                row[f"{name}_gbps"] = gbps
                row[f"{name}_pct_of_read"] = 100 * gbps / read_bw
            row["torch_dequantized_us"] = t_dq["torch_dequantized"] / dq_count * 1e6
            for name in ("vllm", "torch_dequantized"):
                if f"{name}_us" in row:
                    row[f"speedup_vs_{name}"] = row[f"{name}_us"] / row["ours_us"]
            if isinstance(handlers, str):
                row["vllm_error"] = handlers
            if args.cpu_time:
                stream_buf = torch.ones(max(count * qbytes, COLD_STATE_BYTES) // 4)
                fns1 = {**fns, "stream": lambda i: ops.stream_scale_(stream_buf, 1.0) if i == 0 else None}
                t1 = _one_thread(lambda: _time_side_by_side(fns1, count, args.repeat, time.thread_time))()
                stream1 = 2 * stream_buf.numel() * 4 / t1.pop("stream") / 1e9
                row["stream_1t_cpu_gbps"] = stream1
                for name, t in t1.items():
                    row[f"{name}_1t_cpu_gbps"] = qbytes * count / t / 1e9
                    row[f"{name}_1t_pct_of_stream"] = 100 * row[f"{name}_1t_cpu_gbps"] / stream1
                if "vllm" in t1:
                    row["speedup_vs_vllm_1t_cpu"] = t1["vllm"] / t1["ours"]
                del stream_buf
            rows.append(row)
            print_row(row, args)
        del handlers, qs, dq
    return rows


def bench_gemv(args) -> list[dict]:
    vl = None if args.no_vllm else _vllm_onednn()
    bw = stream_gbps()
    read_bw = read_gbps()
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    ms = [int(m) for m in args.ms.split(",")]
    rows = []
    for wname in args.weight_dtypes.split(","):
        if wname == "int4":
            rows += _int4_rows(args, shapes, ms, bw, read_bw)
            continue
        if wname in QUANTIZED:
            rows += _quantized_rows(args, wname, shapes, ms, bw, read_bw)
            continue
        wdtype = getattr(torch, wname)
        pool_elems = -(-COLD_STATE_BYTES // wdtype.itemsize)
        buf = torch.empty(pool_elems, dtype=wdtype).fill_(0.01)
        for N, K in shapes:
            count = max(2, pool_elems // (N * K))
            weights = buf[: count * N * K].view(count, N, K)
            wbytes = N * K * wdtype.itemsize
            handlers = None
            if vl is not None:
                try:
                    handlers = [vl[0](weights[i].t(), 32) for i in range(count)]
                except RuntimeError as e:
                    handlers = str(e).splitlines()[0][:120]
            for M in ms:
                gen = torch.Generator().manual_seed(M)
                x = torch.randn(M, K, generator=gen).to(wdtype)
                out = torch.empty(M, N, dtype=wdtype)
                fns = {
                    "ours": lambda i: ops.small_linear(x, weights[i], out=out),
                    "torch": lambda i: F.linear(x, weights[i]),
                }
                if isinstance(handlers, list):
                    fns["vllm"] = lambda i: vl[1](handlers[i], x, None)
                times = _time_side_by_side(fns, count, args.repeat)
                row = {"N": N, "K": K, "M": M, "weight_dtype": wname, "threads": torch.get_num_threads(),
                       "isa": ops.runtime_info()["isa"], "gemm": ops.runtime_info()["gemm"],
                       "pool_weights": count, "pool_mib": count * wbytes / 2**20, "stream_gbps": bw,
                       "read_gbps": read_bw}
                for name, t in times.items():
                    gbps = wbytes * count / t / 1e9
                    row[f"{name}_us"] = t / count * 1e6
                    row[f"{name}_gbps"] = gbps
                    row[f"{name}_pct_of_stream"] = 100 * gbps / bw
                    row[f"{name}_pct_of_read"] = 100 * gbps / read_bw
                for name in times:
                    if name != "ours":
                        row[f"speedup_vs_{name}"] = times[name] / times["ours"]
                if isinstance(handlers, str):
                    row["vllm_error"] = handlers
                if args.cpu_time:
                    # The stream probe once per pass (its first call), over a cold buffer as large as the pool.
                    stream_buf = torch.ones(max(count * wbytes, COLD_STATE_BYTES) // 4)
                    fns1 = {**fns, "stream": lambda i: ops.stream_scale_(stream_buf, 1.0) if i == 0 else None}
                    t1 = _one_thread(lambda: _time_side_by_side(fns1, count, args.repeat, time.thread_time))()
                    stream1 = 2 * stream_buf.numel() * 4 / t1.pop("stream") / 1e9
                    row["stream_1t_cpu_gbps"] = stream1
                    for name, t in t1.items():
                        gbps = wbytes * count / t / 1e9
                        row[f"{name}_1t_cpu_gbps"] = gbps
                        row[f"{name}_1t_pct_of_stream"] = 100 * gbps / stream1
                    for name in t1:
                        if name != "ours":
                            row[f"speedup_vs_{name}_1t_cpu"] = t1[name] / t1["ours"]
                    del stream_buf
                rows.append(row)
                print_row(row, args)
            del handlers, weights
        del buf
    return rows


def add_parser(sub, common) -> None:
    g = sub.add_parser("gemv", parents=[common],
                       help="small-batch projections: weights streamed GB/s vs the stream, ours vs vLLM vs torch")
    g.set_defaults(run=bench_gemv)
    g.add_argument("--shapes", default=DEFAULT_SHAPES, help="weight shapes NxK, comma-separated")
    g.add_argument("--ms", default="1,4,16", help="token counts M, comma-separated")
    g.add_argument("--weight-dtypes", default="float32,bfloat16",
                   help="float32, bfloat16, float16; int8 (weight-only int8 rows: ours vs vLLM's W8A8 int8 GEMM); "
                        "int4 (vLLM's W4A16 GEMM, group 128, vs torch on a dequantized copy: no int4 kernel of ours yet)")
    g.add_argument("--x-dtype", default="bfloat16", help="activation dtype of the int8 / int4 rows")
    g.set_defaults(repeat=2)  # passes over a > 1.4 GB pool: two rounds keep the run under a minute
    g.add_argument("--cpu-time", action="store_true",
                   help="also time each implementation on one thread by CPU time (time.thread_time) against "
                        "the stream probe measured the same way: figures a loaded machine distorts less")


add_parsers = add_parser  # the name every bench module registers its subcommands under (bench.__main__)
