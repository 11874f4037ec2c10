"""What every replaced vLLM layer shares: the activation log line and the conv activations our
kernels fuse."""

from __future__ import annotations

from vllm.logger import init_logger

# Under vLLM's logger namespace so the line goes through vLLM's handlers and format (vLLM configures
# only the "vllm" logger tree).
logger = init_logger("vllm.plugins.vllm_gdn_cpu")

# Conv activations our causal conv1d kernels apply (value: fused SiLU).
CONV_ACTIVATIONS = {"silu": True, "swish": True, None: False}

_logged_classes: set[str] = set()


def log_activation(vllm_class: str) -> None:
    """Logs, once per process and replaced vLLM layer class, the line naming that class and the
    kernels' ISA, GEMM path and threads. Called from the layer's ``__init__``: vLLM loads plugins
    before it configures its logging, so a line from ``register()`` would be dropped, and the layer
    is where our kernels really run."""
    if vllm_class not in _logged_classes:
        _logged_classes.add(vllm_class)
        logger.info(activation_message(vllm_class))


def activation_message(vllm_class: str) -> str:
    info = _runtime_info()
    described = ", ".join(f"{key}={info.get(key, 'unknown')}" for key in ("isa", "gemm", "threads"))
    return f"vllm_gdn_cpu: CPU kernels for {vllm_class} ({described})"


def _runtime_info() -> dict:
    from vllm_gdn_cpu import ops

    try:
        return dict(ops.runtime_info())
    except Exception:  # a log line must never take the engine down: its fields then say "unknown"
        return {}
