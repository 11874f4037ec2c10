"""Tiny checkpoints built locally (random weights, each family's real layouts and on-disk formats),
for the tests, the demo and the benchmarks: no hub, no network. One module per family
(``tiny_models``: Qwen3-Next; ``tiny_qwen3_5``, ``tiny_olmo_hybrid``, ``tiny_mamba2``,
``tiny_mamba1``, ``tiny_kimi``, ``tiny_mtp``), ``tiny_published`` (each family's flagship per-layer
shapes), ``tiny_quant`` (quantized copies in the formats vLLM reads) and ``checkpoint`` (what the
config-table builders share). Imports nothing from
``vllm_gdn_cpu.tools``."""
