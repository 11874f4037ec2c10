"""vLLM glue: our subclasses of vLLM's recurrent-state layers (one module per layer family), the
mamba-type attention backend they use, and speculative decoding. ``vllm_gdn_cpu.plugin`` imports
these; nothing here imports the plugin."""
