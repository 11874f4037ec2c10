"""Benchmarks: ``python -m vllm_gdn_cpu.tools.bench SUBCOMMAND`` (the subcommands: ``__main__``).

``harness`` is the shared measuring harness; one module per family or setting (gdn, mamba2, mamba1,
kda, gemv, e2e, mtp, overhead, mamba2_layer, roofline) imports it, never another bench module;
``models`` holds the model configs the in-vLLM benches serve.

A new family's bench: a module here with ``add_parsers(sub, common)`` that adds its subcommands
(each parser ``set_defaults(run=<function(args) -> rows>)``, ``harness.add_decays_argument`` for
inputs with decays), importing only the harness, ``vllm_gdn_cpu.ops`` and ``vllm_gdn_cpu.reference``;
then its name in ``__main__.BENCH_MODULES``. tests/test_bench_imports.py checks the import rules."""
