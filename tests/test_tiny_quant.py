"""The quantized-checkpoint writers (vllm_gdn_cpu.testing.tiny_quant) against vLLM's own unpacking
code: what vLLM reads back from each format is the weight the writer says it wrote."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_gdn_cpu.testing import tiny_quant as tq

N, K = 96, 256


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.05


def test_pack_roundtrip_and_order():
    values = torch.randint(0, 16, (5, 24), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    for order in (tuple(range(8)), tq.AWQ_ORDER):
        packed = tq.pack_int4(values, dim=1, order=order)
        assert packed.dtype == torch.int32 and packed.shape == (5, 3)
        assert torch.equal(tq.unpack_int4(packed, dim=1, order=order), values)
    # nibble j of a word holds element j (standard order), element order[j] (AWQ)
    word = tq.pack_int4(torch.arange(8).unsqueeze(0), dim=1)[0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * j)) & 0xF for j in range(8)] == list(range(8))
    with pytest.raises(ValueError, match="multiple of 8"):
        tq.pack_int4(values[:, :7], dim=1)


def test_int8_and_int4_dequantize_within_half_a_step(weight):
    q, scale, deq = tq.quantize_int8_channel(weight)
    assert q.dtype == torch.int8 and scale.shape == (N, 1)
    assert torch.equal(deq, q.float() * scale.float())
    assert ((deq - weight).abs() <= scale.float() / 2 + 1e-7).all()
    for group in (128, -1):
        q, scale, deq = tq.quantize_int4_symmetric(weight, group, torch.bfloat16)
        assert int(q.min()) >= -8 and int(q.max()) <= 7
        step = scale.float().repeat_interleave(K if group == -1 else group, dim=1)
        assert ((deq - weight).abs() <= step / 2 + 1e-7).all()
    q, scale, zero, deq = tq.quantize_int4_asymmetric(weight, 128, torch.bfloat16)
    step = scale.float().repeat_interleave(128, dim=1)
    # the rounded zero point shifts the grid: values at a group's edge may clamp by up to a step
    assert ((deq - weight).abs() <= step + 1e-6).all()
    assert (deq - weight).abs().mean() <= step.mean() / 3
    with pytest.raises(ValueError, match="group size"):
        tq.quantize_int4_symmetric(weight[:, :100], 128, torch.bfloat16)


def test_fp8_block_scales(weight):
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(2))
    q, scale_inv, deq = tq.quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (2, 3)
    # e4m3: 3 mantissa bits (half an ulp: 1/16 relative), subnormal steps of 2^-9 times the scale
    assert torch.allclose(deq, w, rtol=1 / 16, atol=float(scale_inv.max()) * 2**-10)
    full = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    assert torch.equal(deq, q.float() * full)


def _save(tmp_path, tensors, config):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq", "fp8-block"])
def test_written_checkpoint_reads_back_as_the_dequantized_weight(tmp_path, weight, fmt, monkeypatch):
    """Unpacked with vLLM's helpers (vllm.model_executor.layers.quantization.utils.quant_utils) and
    vLLM's AWQ-to-standard conversion where it has one."""
    pytest.importorskip("vllm")
    from safetensors.torch import load_file
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    src = _save(tmp_path, {"a.proj.weight": weight, "b.proj.weight": weight.flip(0).contiguous(),
                           "norm.weight": torch.ones(K)}, {"model_type": "x"})
    rules = [(r"a\.proj", "w4a16-g128"), (r"b\.proj", "w8a8")] if fmt == "compressed-tensors" else [(r"a\.proj", "x")]
    ckpt = tq.quantize_checkpoint(src, tmp_path / "dst", fmt, rules)
    tensors = load_file(tmp_path / "dst" / "model.safetensors")
    config = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]
    deq = ckpt.dequantized["a.proj.weight"]
    u4 = scalar_types.uint4
    if fmt == "compressed-tensors":
        assert config["format"] == "mixed-precision" and len(config["config_groups"]) == 2
        assert [g["targets"] for g in config["config_groups"].values()] == [[r"re:a\.proj"], [r"re:b\.proj"]]
        q = unpack_quantized_values_into_int32(tensors["a.proj.weight_packed"], u4, 1) - 8  # uint4b8
        scale = tensors["a.proj.weight_scale"].float().repeat_interleave(128, 1)
        assert torch.equal(q.float() * scale, deq)
        assert tensors["a.proj.weight_shape"].tolist() == [N, K]
        assert torch.equal(tensors["b.proj.weight"].float() * tensors["b.proj.weight_scale"].float(),
                           ckpt.dequantized["b.proj.weight"])
        assert ckpt.schemes == {"a.proj": "w4a16-g128", "b.proj": "w8a8"}
    elif fmt == "gptq":
        q = unpack_quantized_values_into_int32(tensors["a.proj.qweight"], u4, 0) - 8  # [K, N]
        scale = tensors["a.proj.scales"].float().repeat_interleave(128, 0)  # [K, N]
        assert torch.equal((q.float() * scale).t(), deq)
        assert (unpack_quantized_values_into_int32(tensors["a.proj.qzeros"], u4, 1) == 7).all()
        assert tensors["a.proj.g_idx"].tolist() == [k // 128 for k in range(K)]
        assert "b.proj.qweight" not in tensors and "b.proj.weight" in tensors
    elif fmt == "awq":
        import vllm.model_executor.parameter as parameter
        from vllm.model_executor.layers.quantization.auto_awq import _convert_awq_to_standard_format

        # its parameters ask for the tensor-parallel rank: one rank, no process group here
        monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
        monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 1)
        layer = torch.nn.Module()
        layer.qweight = torch.nn.Parameter(tensors["a.proj.qweight"], requires_grad=False)
        layer.qzeros = torch.nn.Parameter(tensors["a.proj.qzeros"], requires_grad=False)
        _convert_awq_to_standard_format(layer, "qweight", "qzeros", 4)
        q = unpack_quantized_values_into_int32(layer.qweight.data, u4, 0)  # [K, N]
        zero = unpack_quantized_values_into_int32(layer.qzeros.data, u4, 0)  # [N, G]
        scale = tensors["a.proj.scales"].float()  # [G, N]
        w = (q - zero.t().repeat_interleave(128, 0)).float() * scale.repeat_interleave(128, 0)
        assert torch.equal(w.t(), deq)
        assert config["modules_to_not_convert"] == ["b.proj", "lm_head"]
    else:
        full = tensors["a.proj.weight_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)[:N, :K]
        assert torch.equal(tensors["a.proj.weight"].float() * full, deq)
        assert config["weight_block_size"] == [128, 128] and config["quant_method"] == "fp8"


def test_bad_arguments(tmp_path, weight):
    src = _save(tmp_path, {"a.proj.weight": weight}, {})
    with pytest.raises(ValueError, match="fmt="):
        tq.quantize_checkpoint(src, tmp_path / "d", "int3", [])
    with pytest.raises(ValueError, match="no weight"):
        tq.quantize_checkpoint(src, tmp_path / "d", "gptq", [(r"nothing", "x")])
    with pytest.raises(ValueError, match="scheme"):
        tq.quantize_checkpoint(src, tmp_path / "d", "compressed-tensors", [(r"a\.proj", "w2a16")])
