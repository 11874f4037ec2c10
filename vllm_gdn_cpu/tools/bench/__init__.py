"""Benchmarks: ``python -m vllm_gdn_cpu.tools.bench SUBCOMMAND`` (the subcommands: ``__main__``).

``harness`` is the shared measuring harness; one module per family or setting (gdn, mamba2, mamba1,
kda, gemv, e2e, mtp, overhead, mamba2_layer, roofline) imports it, never another bench module;
``models`` holds the model configs the in-vLLM benches serve."""
