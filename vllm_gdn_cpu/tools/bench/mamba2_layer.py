"""Side-by-side timing of the Mamba2 layer core inside vLLM, in one process:
``python -m vllm_gdn_cpu.tools.bench mamba2-layer [--layers 8] [--batches 1,16] [--prompt-len 256]``.

A Granite-4.0-H-shaped model (``models.write_granite_4h_config``, dummy weights, bf16, prefix
caching off; decays spread over the heads by ``models.realistic_decays``; no denormal flush) runs
with ``VLLM_ATTENTION_BACKEND=GDN_CPU``; at every call of a Mamba2 layer's core,
our ``forward_core`` and vLLM's own ``MambaMixer2.conv_ssm_forward`` (on clones of the layer's
states, so both see the same inputs and states) run back to back, their order alternating. So both
paths are timed under the same machine load, which makes the ratio meaningful on a shared machine
where whole-engine runs in separate processes are not. Prints the median time per layer call of
each path for prefill steps (the batch's prompts in one step) and decode steps, and the ratio.
"""

from __future__ import annotations

import collections
import os
import statistics
import tempfile
import time
from pathlib import Path

from vllm_gdn_cpu.tools.bench.harness import print_row
from vllm_gdn_cpu.tools.bench.models import realistic_decays, write_granite_4h_config


def add_parsers(sub, common) -> None:
    m = sub.add_parser("mamba2-layer", parents=[common],
                       help="Mamba2 layer core inside vLLM: ours and vLLM's MambaMixer2 on the same calls, side by side")
    m.set_defaults(run=bench_mamba2_layer, repeat=3)
    m.add_argument("--layers", type=int, default=8)
    m.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    m.add_argument("--prompt-len", type=int, default=256)
    m.add_argument("--decode-steps", type=int, default=8)


def bench_mamba2_layer(args) -> list[dict]:
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", VLLM_ATTENTION_BACKEND="GDN_CPU")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2

    import vllm_gdn_cpu
    from vllm_gdn_cpu.layers.mamba2 import GDNCPUMambaMixer2

    times = collections.defaultdict(list)
    ours_core = GDNCPUMambaMixer2.forward_core
    order = [False]

    def side_by_side(self, projected_states, output, metadata):
        saved, clones = self.kv_cache, tuple(t.clone() for t in self.kv_cache)
        theirs_out = torch.zeros_like(output)

        def theirs():
            self.kv_cache = clones
            try:
                t0 = time.perf_counter()
                MambaMixer2.conv_ssm_forward(self, projected_states, theirs_out)
                return time.perf_counter() - t0
            finally:
                self.kv_cache = saved

        def ours():
            t0 = time.perf_counter()
            ours_core(self, projected_states, output, metadata)
            return time.perf_counter() - t0

        order[0] = not order[0]
        if order[0]:
            t_ours, t_theirs = ours(), theirs()
        else:
            t_theirs, t_ours = theirs(), ours()
        key = ("prefill" if metadata.num_prefills else "decode", metadata.num_decodes + metadata.num_prefills)
        times[key + ("ours",)].append(t_ours)
        times[key + ("vllm",)].append(t_theirs)

    GDNCPUMambaMixer2.forward_core = side_by_side
    vllm_gdn_cpu.register()
    with tempfile.TemporaryDirectory(prefix="mamba2_layer_") as tmp:
        model_dir = write_granite_4h_config(Path(tmp), args.layers)
        llm = LLM(model=model_dir.as_posix(), load_format="dummy", skip_tokenizer_init=True, dtype=args.dtype,
                  enforce_eager=True, max_model_len=args.prompt_len + args.decode_steps + 8,
                  max_num_seqs=max(args.batches), max_num_batched_tokens=max(args.batches) * args.prompt_len,
                  seed=0, enable_prefix_caching=False)
        assert all(llm.apply_model(realistic_decays)), "no Mamba2 layer found"
        params = SamplingParams(max_tokens=args.decode_steps + 1, min_tokens=args.decode_steps + 1,
                                temperature=0.0, ignore_eos=True)
        for b in args.batches:
            for r in range(args.repeat):
                prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 13 * j + r) % 31000 + 100
                                                          for j in range(args.prompt_len)]) for i in range(b)]
                llm.generate(prompts, params, use_tqdm=False)
        llm.llm_engine.engine_core.shutdown()
    rows = []
    for key in sorted(k[:2] for k in times if k[2] == "ours"):
        ours_t, theirs_t = statistics.median(times[key + ("ours",)]), statistics.median(times[key + ("vllm",)])
        row = {"phase": key[0], "batch": key[1], "calls": len(times[key + ("ours",)]),
               "ours_ms_per_layer_call": ours_t * 1e3, "vllm_ms_per_layer_call": theirs_t * 1e3,
               "speedup_vs_vllm": theirs_t / ours_t}
        rows.append(row)
        print_row(row, args)
    return rows
