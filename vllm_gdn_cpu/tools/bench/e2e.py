"""End-to-end benchmark inside vLLM: ``python -m vllm_gdn_cpu.tools.bench e2e``.

A 24-layer Qwen3-Next-shaped model (hidden 1024, linear heads 16 k / 32 v x 128, full attention
every 4th layer, layer 0 MoE as vLLM requires, the rest dense) is generated locally as a config
with dummy weights, then served by vLLM twice, each in its own process: with our backend
(VLLM_ATTENTION_BACKEND=GDN_CPU) and with vLLM's built-in CPU GDN path. For batch 1 and 16 it
reports prefill tokens/s and decode ms/step, timed per engine step (step 0 prefills the whole
batch, the rest decode: their median), and the GDN core op's time and share in those steps
(``vllm::gdn_cpu_attention_core`` for ours, ``vllm::cpu_gdn_attention_core`` for vLLM's),
measured with torch.profiler on a separate pass so the timings themselves run unprofiled; that pass
also splits a step into the recurrent layers' projections, their core op, the rest of those layers
(norm, splits) and the rest of the model. ``--backends ours-vllm-proj`` adds our layers with vLLM's
own projections and norm (``VLLM_GDN_CPU_PROJECTIONS=vllm``): what our small-batch projections gain.
Both backends run eagerly (``enforce_eager``: no torch.compile, whose compile time on CPU would
dwarf these runs), every measured shape warmed up first, prefix caching off (the same prompts
repeat), the recurrent layers' decay parameters spread over the heads as in trained checkpoints
(``models.realistic_decays``: dummy weights leave them near 0), and the floating-point environment
as users have it (no denormal flush).

``--model granite_4h`` benchmarks a Granite-4.0-H-shaped Mamba2 hybrid instead (hidden 1024, Mamba2
layers of 32 heads x 64 with d_state 128 and one group, an attention layer every 8th, dense MLPs):
our ``MambaMixer2`` replacement (core op ``vllm::mamba2_cpu_core``) vs vLLM's CPU Mamba2 path
(``vllm::mamba_mixer2``). The ``gdn_core_*`` fields then time that core op.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_gdn_cpu.tools.bench.models import realistic_decays, write_config, write_granite_4h_config

BACKENDS = {"ours": "GDN_CPU", "ours-vllm-proj": "GDN_CPU", "vllm": None}
# ours-vllm-proj: our layers with vLLM's own projections and norm (VLLM_GDN_CPU_PROJECTIONS=vllm).
CORE_OPS = {"ours": "vllm::gdn_cpu_attention_core", "ours-vllm-proj": "vllm::gdn_cpu_attention_core",
            "vllm": "vllm::cpu_gdn_attention_core"}
MAMBA2_CORE_OPS = {"ours": "vllm::mamba2_cpu_core", "ours-vllm-proj": "vllm::mamba2_cpu_core",
                   "vllm": "vllm::mamba_mixer2"}


MODELS = {"qwen3_next": (write_config, CORE_OPS), "granite_4h": (write_granite_4h_config, MAMBA2_CORE_OPS)}
# The recurrent layer class of each model (vLLM's and ours derive from it) and its projection modules.
MIXERS = {"qwen3_next": ("QwenGatedDeltaNetAttention", ("in_proj_qkvz", "in_proj_ba", "out_proj")),
          "granite_4h": ("MambaMixer2", ("in_proj", "out_proj"))}
MIXER_RANGE, PROJECTION_RANGE = "e2e::mixer_layer", "e2e::mixer_projections"
_profiling = [False]  # the ranges below are recorded only in the profiled pass


def _profile_range(module, name: str) -> None:
    """torch.profiler range `name` around every call of `module` (forward hooks), when profiling."""
    import torch

    open_ranges = []

    def enter(mod, args):
        if _profiling[0]:
            open_ranges.append(torch.profiler.record_function(name))
            open_ranges[-1].__enter__()

    def leave(mod, args, output):
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def add_profile_ranges(model_name: str):
    """For llm.apply_model: profiler ranges around each recurrent layer and its projections, so a
    step's time splits into projections / core op / the layer's other work / the rest of the model."""
    def apply(model) -> int:
        class_name, projections = MIXERS[model_name]
        count = 0
        for module in model.modules():
            if any(cls.__name__ == class_name for cls in type(module).__mro__):
                _profile_range(module, MIXER_RANGE)
                for name in projections:
                    _profile_range(getattr(module, name), PROJECTION_RANGE)
                count += 1
        return count
    return apply


def worker(model_dir: str, backend: str, batches: list[int], prompt_len: int, decode_steps: int, tp: int,
           model: str = "qwen3_next", dtype: str = "bfloat16") -> dict:
    """Runs in a child process whose environment already selects the backend."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype=dtype,
              enforce_eager=True, max_model_len=prompt_len + decode_steps + 8, max_num_seqs=max(batches),
              max_num_batched_tokens=max(batches) * prompt_len, tensor_parallel_size=tp, seed=0,
              enable_prefix_caching=False)  # the same prompts run repeatedly: every run prefills
    assert all(llm.apply_model(realistic_decays)), "no recurrent layer found"
    if tp == 1:
        assert all(llm.apply_model(add_profile_ranges(model))), "no recurrent layer found"

    def prompts(b):
        return [TokensPrompt(prompt_token_ids=[(7 * i + 13 * j) % 31000 + 100 for j in range(prompt_len)])
                for i in range(b)]

    engine = llm.llm_engine
    request_ids = itertools.count()

    def run_steps(b: int, profile: bool) -> list[float]:
        """b prompts to decode_steps + 1 new tokens, one engine step at a time. Step 0 prefills every
        prompt (max_num_batched_tokens fits them) and samples the first tokens; the later steps
        decode. Returns each step's wall time, or with profile a dict of its times: the step, the
        core op, the recurrent layers, their projections (seconds)."""
        params = SamplingParams(max_tokens=decode_steps + 1, min_tokens=decode_steps + 1, temperature=0.0,
                                ignore_eos=True)
        for p in prompts(b):
            engine.add_request(f"e2e-{next(request_ids)}", p, params)
        times = []
        while engine.has_unfinished_requests():
            if profile:
                _profiling[0] = True
                try:
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                        t0 = time.perf_counter()
                        engine.step()
                        step = time.perf_counter() - t0
                finally:
                    _profiling[0] = False
                totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}
                times.append({"step": step, "core": totals.get(MODELS[model][1][backend], 0.0),
                              "mixer": totals.get(MIXER_RANGE, 0.0),
                              "projections": totals.get(PROJECTION_RANGE, 0.0)})
            else:
                t0 = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t0)
        return times

    rows = []
    for b in batches:  # warm-up of every measured shape: compilation stays out of the timings
        run_steps(b, profile=False)
    for b in batches:
        passes = [run_steps(b, profile=False) for _ in range(2)]
        t_prefill = min(p[0] for p in passes)
        t_decode = min(statistics.median(p[1:decode_steps + 1]) for p in passes)
        row = {"backend": backend, "batch": b, "prompt_len": prompt_len, "tp": tp,
               "prefill_tok_s": b * prompt_len / t_prefill, "decode_ms_per_step": 1e3 * t_decode}
        if tp == 1:  # the profiler sees only this process's ops; profiled on a separate pass
            profiled = run_steps(b, profile=True)
            core_decode = statistics.median(p["core"] for p in profiled[1:decode_steps + 1])
            row["gdn_core_prefill_tok_s"] = b * prompt_len / max(profiled[0]["core"], 1e-9)
            row["gdn_core_ms_per_decode_step"] = 1e3 * core_decode
            row["gdn_core_share_prefill"] = profiled[0]["core"] / t_prefill
            row["gdn_core_share_decode"] = core_decode / t_decode
            # Where a (profiled) step's time goes, as shares of that step: the recurrent layers'
            # projections, their core op, the rest of those layers (norm, splits, glue), the rest of
            # the model (attention layers, MLPs, embedding, sampling, scheduling).
            for phase, steps in (("prefill", profiled[:1]), ("decode", profiled[1:decode_steps + 1])):
                split = {"projections": [p["projections"] / p["step"] for p in steps],
                         "core": [p["core"] / p["step"] for p in steps],
                         "mixer_other": [(p["mixer"] - p["projections"] - p["core"]) / p["step"] for p in steps],
                         "rest": [1.0 - p["mixer"] / p["step"] for p in steps]}
                for part, shares in split.items():
                    row[f"split_{phase}_{part}"] = statistics.median(shares)
        row["model"] = model
        rows.append(row)
    return {"rows": rows}


def run_backend(backend: str, model_dir: Path, args) -> list[dict]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
               VLLM_ENABLE_V1_MULTIPROCESSING="0" if args.tp == 1 else "1", HF_HUB_OFFLINE="1")
    env.pop("VLLM_ATTENTION_BACKEND", None)
    if BACKENDS[backend]:
        env["VLLM_ATTENTION_BACKEND"] = BACKENDS[backend]
    env.pop("VLLM_GDN_CPU_PROJECTIONS", None)
    if backend == "ours-vllm-proj":
        env["VLLM_GDN_CPU_PROJECTIONS"] = "vllm"
    if args.tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(args.tp))  # one core per rank
    code = ("import json, sys; from vllm_gdn_cpu.tools.bench.e2e import worker; "
            f"print('E2E_RESULT ' + json.dumps(worker({str(model_dir)!r}, {backend!r}, {args.batches!r}, "
            f"{args.prompt_len}, {args.decode_steps}, {args.tp}, {args.model!r}, {args.dtype!r})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("E2E_RESULT "):
            return json.loads(line[len("E2E_RESULT "):])["rows"]
    tail = (proc.stdout + proc.stderr)[-3000:]
    raise RuntimeError(f"e2e benchmark of backend {backend!r} failed (exit {proc.returncode}):\n{tail}")


def add_parsers(sub, common) -> None:
    e = sub.add_parser("e2e", parents=[common], help="vLLM end to end: ours vs vLLM's built-in GDN path")
    e.set_defaults(run=bench_e2e)
    e.add_argument("--layers", type=int, default=24)
    e.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    e.add_argument("--prompt-len", type=int, default=256)
    e.add_argument("--decode-steps", type=int, default=16)
    e.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (ours only when > 1)")
    e.add_argument("--backends", default="ours,vllm",
                   help="comma list of ours, vllm, ours-vllm-proj (our layers with vLLM's projections and norm)")
    e.add_argument("--timeout", type=int, default=1800)
    e.add_argument("--model", choices=sorted(MODELS), default="qwen3_next",
                   help="qwen3_next (GDN layers) or granite_4h (Mamba2 layers, MambaMixer2)")
    # State cache capacity (capacity_report): engines only start, nothing is timed.
    e.add_argument("--capacity-len", type=int, default=0,
                   help="instead of timings: how many sequences of this many tokens fit in the cache "
                        "(VLLM_CPU_KVCACHE_SPACE, default 4 GiB) with each --state-dtype, our backend")
    e.add_argument("--state-dtype", default="float32,bfloat16",
                   help="comma list of --mamba-ssm-cache-dtype values for --capacity-len")


def bench_e2e(args) -> list[dict]:
    if args.capacity_len:
        return capacity_report(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gdn_e2e_") as tmp:
        model_dir = MODELS[args.model][0](Path(tmp), args.layers)
        for backend in args.backends.split(","):
            try:
                backend_rows = run_backend(backend, model_dir, args)
            except RuntimeError as error:
                # e.g. vLLM's own CPU GDN path asserts bf16 ("CPU GDN attention requires BF16."):
                # report why and go on with the other backends.
                reason = next((line.strip() for line in reversed(str(error).splitlines())
                               if "Error" in line), str(error).splitlines()[0])
                backend_rows = [{"backend": backend, "batch": b, "failed": reason} for b in args.batches]
            for row in backend_rows:
                rows.append(row)
                if not args.json:
                    print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                          flush=True)
    by_key = {(r["backend"], r["batch"]): r for r in rows if "failed" not in r}
    if not args.json:
        for b in args.batches:
            ours, theirs = by_key.get(("ours", b)), by_key.get(("vllm", b))
            if ours and theirs:
                print(f"# batch {b}: decode step {theirs['decode_ms_per_step'] / ours['decode_ms_per_step']:.2f}x "
                      f"faster, prefill {ours['prefill_tok_s'] / theirs['prefill_tok_s']:.2f}x; GDN core prefill "
                      f"{ours.get('gdn_core_prefill_tok_s', 0) / max(theirs.get('gdn_core_prefill_tok_s', 0), 1e-9):.2f}x,"
                      f" GDN core per decode step "
                      f"{theirs.get('gdn_core_ms_per_decode_step', 0) / max(ours.get('gdn_core_ms_per_decode_step', 0), 1e-9):.2f}x")
        for r in rows:
            for phase in ("decode", "prefill"):
                parts = [f"{part} {100 * r[f'split_{phase}_{part}']:.1f}%"
                         for part in ("projections", "core", "mixer_other", "rest") if f"split_{phase}_{part}" in r]
                if parts:
                    print(f"# {r['backend']} batch {r['batch']} {phase} step: " + ", ".join(parts))
    return rows


def capacity_worker(model_dir: str, seq_len: int, model: str, dtype: str, state_dtype: str) -> dict:
    """Runs in a child process with our backend: starts an engine with ``state_dtype`` as
    ``mamba_ssm_cache_dtype`` and returns what vLLM's engine itself computed for the cache
    (``cache_config.num_gpu_blocks`` and ``kv_cache_max_concurrency``, the figure of vLLM's startup
    line "Maximum concurrency for N tokens per request"), and the SSM state dtype the layers hold."""
    from vllm import LLM

    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype=dtype,
              enforce_eager=True, max_model_len=seq_len, seed=0, enable_prefix_caching=False,
              mamba_ssm_cache_dtype=state_dtype)
    cache = llm.llm_engine.vllm_config.cache_config
    layer_dtypes = sorted({dtype for dtypes in llm.apply_model(_ssm_state_dtypes) for dtype in dtypes})
    return {"state_dtype": state_dtype, "ssm_cache_dtype": cache.mamba_ssm_cache_dtype,
            "ssm_tensor_dtype": ",".join(layer_dtypes), "seq_len": seq_len,
            "kv_cache_gib": float(os.environ["VLLM_CPU_KVCACHE_SPACE"]), "block_size": cache.block_size,
            "num_blocks": cache.num_gpu_blocks, "max_sequences": cache.kv_cache_max_concurrency}


def _ssm_state_dtypes(model) -> list[str]:
    from vllm_gdn_cpu.layers.gdn import GDNCPUQwenGatedDeltaNetAttention
    from vllm_gdn_cpu.layers.mamba2 import GDNCPUMambaMixer2

    return [str(m.kv_cache[1].dtype) for m in model.modules()
            if isinstance(m, (GDNCPUQwenGatedDeltaNetAttention, GDNCPUMambaMixer2))]


def capacity_report(args) -> list[dict]:
    """``bench e2e --capacity-len L [--state-dtype float32,bfloat16]``: sequences of L tokens that
    fit in the KV + state cache (``VLLM_CPU_KVCACHE_SPACE`` GiB per rank, default 4) with each SSM
    state dtype, on the benchmark's model with our backend, prefix caching off (one state block per
    sequence). Each engine runs in its own process; the figures are the engine's own."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
               VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", VLLM_ATTENTION_BACKEND="GDN_CPU")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gdn_capacity_") as tmp:
        model_dir = MODELS[args.model][0](Path(tmp), args.layers)
        for state_dtype in args.state_dtype.split(","):
            code = ("import json; from vllm_gdn_cpu.tools.bench.e2e import capacity_worker; "
                    f"print('E2E_RESULT ' + json.dumps(capacity_worker({str(model_dir)!r}, "
                    f"{args.capacity_len}, {args.model!r}, {args.dtype!r}, {state_dtype!r})))")
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("E2E_RESULT ")]
            if not lines:
                tail = (proc.stdout + proc.stderr)[-3000:]
                raise RuntimeError(f"capacity run with state dtype {state_dtype!r} failed "
                                   f"(exit {proc.returncode}):\n{tail}")
            row = {"model": args.model, "layers": args.layers, "dtype": args.dtype,
                   **json.loads(lines[-1][len("E2E_RESULT "):])}
            rows.append(row)
            if not args.json:
                print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
    if not args.json and len(rows) > 1:
        base = rows[0]
        print(f"# {args.model} ({args.layers} layers), {base['seq_len']} tokens per sequence, "
              f"{base['kv_cache_gib']:g} GiB cache: " + ", ".join(
                  f"{r['state_dtype']} state {r['max_sequences']:.1f} sequences "
                  f"({r['max_sequences'] / base['max_sequences']:.2f}x)" for r in rows))
    return rows
