"""``bench mtp``: greedy generation with and without vLLM's MTP speculation, our GDN backend.

One engine per ``--spec-tokens`` value (0 = no speculation), in this process, on a checkpoint with
an MTP head (default: the tiny one of ``tiny_mtp``, built into a temporary directory, served its
fit prompts). Per engine and batch: median process CPU time and wall time of one ``generate`` of
``--max-tokens`` tokens per request over ``--repeat`` runs (after one warm-up), and from vLLM's own
spec-decode counters the drafts per request (= verify steps after the prefill), draft tokens and
accepted tokens (mean acceptance length = 1 + accepted / drafts).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from vllm_gdn_cpu.tools.bench.harness import print_row


def add_parsers(sub, common) -> None:
    m = sub.add_parser("mtp", parents=[common], help="vLLM MTP speculative decoding vs none (tiny model)")
    m.set_defaults(run=bench_mtp)
    m.add_argument("--model-dir", default="", help="checkpoint with mtp.* weights (default: tiny_mtp's)")
    m.add_argument("--spec-tokens", default="0,1,2", help="comma list of num_speculative_tokens (0: none)")
    m.add_argument("--batches", default="1,4")
    m.add_argument("--max-tokens", type=int, default=24)


def _counters(llm) -> dict:
    out = {}
    for metric in llm.get_metrics():
        if metric.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                           "vllm:spec_decode_num_accepted_tokens"):
            out[metric.name.rsplit("_num_", 1)[1]] = int(metric.value)
    return out


def _run(model_dir: Path, prompts: list[list[int]], args) -> list[dict]:
    import vllm_gdn_cpu
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    os.environ.update(VLLM_ATTENTION_BACKEND="GDN_CPU", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                      HF_HUB_OFFLINE="1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    vllm_gdn_cpu.register()
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for k in [int(x) for x in args.spec_tokens.split(",")]:
        spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
        llm = LLM(model=str(model_dir), dtype=args.dtype, skip_tokenizer_init=True, enforce_eager=True,
                  max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=256, seed=0,
                  speculative_config=spec, enable_prefix_caching=False, disable_log_stats=False)
        try:
            for batch in [int(x) for x in args.batches.split(",")]:
                requests = [TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]) for i in range(batch)]
                llm.generate(requests, params, use_tqdm=False)  # warm-up
                before = _counters(llm)
                cpu, wall = [], []
                for _ in range(args.repeat):
                    c, w = time.process_time(), time.perf_counter()
                    llm.generate(requests, params, use_tqdm=False)
                    cpu.append(time.process_time() - c)
                    wall.append(time.perf_counter() - w)
                after = _counters(llm)
                delta = {n: after.get(n, 0) - before.get(n, 0) for n in ("drafts", "draft_tokens", "accepted_tokens")}
                runs = args.repeat * batch
                row = {
                    "spec_tokens": k, "batch": batch, "tokens_per_request": args.max_tokens,
                    "cpu_ms": 1e3 * statistics.median(cpu), "wall_ms": 1e3 * statistics.median(wall),
                    "cpu_ms_min": 1e3 * min(cpu),
                    "drafts_per_request": delta["drafts"] / runs,
                    "accepted_per_request": delta["accepted_tokens"] / runs,
                    "mean_acceptance_length": 1 + delta["accepted_tokens"] / max(delta["drafts"], 1),
                }
                rows.append(row)
                print_row(row, args)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    return rows


def bench_mtp(args) -> list[dict]:
    from vllm_gdn_cpu.testing.tiny_mtp import MARKER, build_tiny_qwen3_next_mtp

    if args.dtype == "bfloat16" and not args.model_dir:
        print("# note: the tiny MTP checkpoint is float32; pass --dtype float32 for its fitted drafts", flush=True)
    with tempfile.TemporaryDirectory(prefix="gdn_mtp_") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else build_tiny_qwen3_next_mtp(
            Path(tmp), log=lambda *a: None)
        fit = model_dir / MARKER
        if fit.is_file():
            prompts = json.loads(fit.read_text())["prompts"]
        else:  # any checkpoint: random prompts of a few lengths
            import random

            vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
            rng = random.Random(0)
            prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (5, 17, 60, 230)]
        return _run(model_dir, prompts, args)
