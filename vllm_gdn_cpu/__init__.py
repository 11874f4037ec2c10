"""vllm-gdn-cpu: fast CPU kernels for Gated DeltaNet (GDN) layers, as an out-of-tree vLLM plugin."""

__version__ = "0.1.0"

# The variable and value that activate the vLLM plugin (here, free of vLLM imports, so that
# kernel-only tools such as ``python -m vllm_gdn_cpu.tools.info`` run where vLLM is not installed).
ENV_VAR = "VLLM_ATTENTION_BACKEND"
BACKEND_NAME = "GDN_CPU"


def is_requested() -> bool:
    """Whether this process asked for our backend (``VLLM_ATTENTION_BACKEND=GDN_CPU``)."""
    import os

    return os.environ.get(ENV_VAR, "").strip() == BACKEND_NAME


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (see ``vllm_gdn_cpu.plugin``)."""
    from vllm_gdn_cpu.plugin import register as _register

    _register()
