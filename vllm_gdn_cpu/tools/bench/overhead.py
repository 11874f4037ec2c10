"""Fixed cost per call of our decode op (dispatch + argument checks + thread fork/join), at decode
batch 1: ``python -m vllm_gdn_cpu.tools.bench overhead``.

The checks cannot be switched off, so the fixed cost is bounded from above by the time of a trivially
small call (Hk=Hv=1, K=V=8: its arithmetic is a few hundred flops), and compared with the time of a
real decode call of the same batch (Qwen3-Next heads, Hk=16, Hv=32, K=V=128) with its state warm in
cache (one pool) and cold (``layers`` pools stepped in turn, as in a model). A floor for torch's own
dispatcher is the time of ``torch.ops.aten.add.out`` on two 8-element tensors. Each figure is the
mean per call over a loop of calls, min and median over several loops; ratios use the min (the
least disturbed loop, on a shared machine).
"""

from __future__ import annotations

import statistics
import time

import torch

from vllm_gdn_cpu import ops

SHAPES = {"trivial": (1, 1, 8, 8), "qwen3-next": (16, 32, 128, 128)}  # Hk, Hv, K, V


def _per_call_us(fn, calls: int, loops: int) -> tuple[float, float]:
    for _ in range(max(1, calls // 10)):
        fn()
    samples = []
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return min(samples), statistics.median(samples)


def _decode_call(Hk, Hv, K, V, dtype, state_dtype, pools: int, direct: bool):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, Hk, K, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(1, Hv, V, generator=gen).to(dtype)
    a, b = (torch.randn(1, Hv, generator=gen).to(dtype) for _ in range(2))
    A_log, dt_bias = torch.zeros(Hv, dtype=dtype), torch.zeros(Hv, dtype=dtype)
    states = [torch.zeros(1, Hv, K, V, dtype=state_dtype) for _ in range(pools)]
    idx = torch.zeros(1, dtype=torch.int32)
    out = torch.empty_like(v)
    scale = K ** -0.5
    op = torch.ops.vllm_gdn_cpu.fused_recurrent_gated_delta_rule
    turn = [0]

    def call():
        state = states[turn[0]]
        turn[0] = (turn[0] + 1) % pools
        if direct:  # the registered op, as torch.ops dispatches it
            op(q, k, v, A_log, dt_bias, a, b, state, idx, None, scale, True, False, 1.0, 20.0, out)
        else:  # the Python API (adds default scale and out handling)
            ops.fused_recurrent_gated_delta_rule(q, k, v, A_log, dt_bias, a, b, state, idx, out=out)

    return call


def bench_overhead(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    state_dtype = getattr(torch, args.state_dtype)
    rows = []
    x, y, z = torch.ones(8), torch.ones(8), torch.empty(8)
    lo, med = _per_call_us(lambda: torch.ops.aten.add.out(x, y, out=z), args.calls * 10, args.loops)
    rows.append({"case": "aten.add.out 8 elems (dispatcher floor)", "us_min": lo, "us_median": med})
    for name, (Hk, Hv, K, V) in SHAPES.items():
        pool_cases = [("warm", 1)] + ([("cold", args.layers)] if name != "trivial" else [])
        for state_case, pools in pool_cases:
            for direct in (True, False):
                call = _decode_call(Hk, Hv, K, V, dtype, state_dtype, pools, direct)
                calls = args.calls * (10 if name == "trivial" else 1)
                lo, med = _per_call_us(call, calls, args.loops)
                rows.append({
                    "case": f"{name} Hk={Hk} Hv={Hv} K={K} V={V} B=1 state {state_case}, "
                            f"{'torch.ops' if direct else 'ops.py'}",
                    "us_min": lo, "us_median": med,
                })
    trivial = next(r for r in rows if r["case"].startswith("trivial") and "torch.ops" in r["case"])
    for row in rows:
        row["trivial_pct"] = 100.0 * trivial["us_min"] / row["us_min"]
    if not args.json:
        print(f"# dtype={args.dtype} state={args.state_dtype} threads={torch.get_num_threads()}; "
              f"trivial/this: min time of the trivial call / min time of this case", flush=True)
        for row in rows:
            print(f"{row['case']:<72} min {row['us_min']:8.2f} us  median {row['us_median']:8.2f} us"
                  f"  trivial/this {row['trivial_pct']:5.1f}%", flush=True)
    return rows


def add_parsers(sub, common) -> None:
    o = sub.add_parser("overhead", parents=[common],
                       help="fixed per-call cost of the decode op at batch 1 vs a real call")
    o.set_defaults(run=bench_overhead)
    o.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    o.add_argument("--calls", type=int, default=200, help="calls per timed loop (x10 for tiny)")
    o.add_argument("--loops", type=int, default=7)
    o.add_argument("--layers", type=int, default=48, help="state pools of the cold case")
