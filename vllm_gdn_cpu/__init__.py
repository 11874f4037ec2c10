"""vllm-gdn-cpu: fast CPU kernels for Gated DeltaNet (GDN) layers, as an out-of-tree vLLM plugin."""

__version__ = "0.1.0"


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (see ``vllm_gdn_cpu.plugin``)."""
    from vllm_gdn_cpu.plugin import register as _register

    _register()
