"""gdn_decode_step (one GDN layer's decode core in one op) equals causal_conv1d followed by
fused_recurrent_gated_delta_rule bit for bit, and matches the float64 references."""

import pytest
import torch

from gdn_cases import DTYPE_IDS, OUT_RTOL, assert_close_rel, forced_isa, isas
from vllm_gdn_cpu import ops
from vllm_gdn_cpu.reference import causal_conv1d_ref, fused_recurrent_gated_delta_rule_ref


def make_step(B, Hk, Hv, K, V, dtype, state_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    D = 2 * Hk * K + Hv * V
    slots = (3 * torch.arange(B)).to(torch.int32)
    num_slots = 3 * B + 1
    return dict(
        mixed_qkv=torch.randn(B, D + 5, generator=gen).to(dtype)[:, :D],
        conv_weight=torch.randn(D, 4, generator=gen) * 0.5, conv_bias=None,
        conv_state=torch.randn(num_slots, 3, D, generator=gen).to(dtype),
        A_log=torch.linspace(-1, 0.5, Hv), dt_bias=torch.linspace(-0.5, 0.5, Hv),
        a=torch.randn(B, Hv, generator=gen).to(dtype), b=torch.randn(B, Hv, generator=gen).to(dtype),
        ssm_state=(0.3 * torch.randn(num_slots, Hv, K, V, generator=gen)).to(state_dtype),
        state_indices=slots, dims=(Hk, K, V),
    )


def fused(s, **kw):
    Hk, K, V = s["dims"]
    conv_state, ssm_state = s["conv_state"].clone(), s["ssm_state"].clone()
    out = ops.gdn_decode_step(s["mixed_qkv"], s["conv_weight"], s["conv_bias"], conv_state, s["A_log"],
                              s["dt_bias"], s["a"], s["b"], ssm_state, s["state_indices"], num_k_heads=Hk,
                              head_k_dim=K, head_v_dim=V, **kw)
    return out, conv_state, ssm_state


def unfused(s, conv=ops.causal_conv1d, recurrent=ops.fused_recurrent_gated_delta_rule, **extra):
    Hk, K, V = s["dims"]
    B = s["mixed_qkv"].shape[0]
    conv_state, ssm_state = s["conv_state"].clone(), s["ssm_state"].clone()
    if "compute_dtype" in extra:
        conv_state, ssm_state = conv_state.double(), ssm_state.double()
    cu = torch.arange(B + 1, dtype=torch.int32)
    if conv is causal_conv1d_ref:
        qkv = conv(s["mixed_qkv"], s["conv_weight"], None, conv_state, s["state_indices"], cu, None, True, **extra)
    else:
        qkv = conv(s["mixed_qkv"], s["conv_weight"], None, conv_state, s["state_indices"], cu)
    q = qkv[:, : Hk * K].unflatten(1, (Hk, K))
    k = qkv[:, Hk * K : 2 * Hk * K].unflatten(1, (Hk, K))
    v = qkv[:, 2 * Hk * K :].unflatten(1, (-1, V))
    out = recurrent(q, k, v, s["A_log"], s["dt_bias"], s["a"], s["b"], ssm_state, s["state_indices"], **extra)
    return out, conv_state, ssm_state


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_decode_step_equals_unfused_ops_bitwise(isa, dtype, state_dtype):
    s = make_step(5, 2, 4, 32, 64, dtype, state_dtype)
    with forced_isa(isa):
        got, want = fused(s), unfused(s)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_decode_step_matches_float64_reference_with_padding():
    s = make_step(4, 1, 2, 64, 128, torch.float32, torch.float32, seed=1)
    s["state_indices"][2] = -1
    out, conv_state, ssm_state = fused(s)
    ref_out, ref_conv, ref_ssm = unfused(s, conv=causal_conv1d_ref, recurrent=fused_recurrent_gated_delta_rule_ref,
                                         compute_dtype=torch.float64)
    assert_close_rel(out, ref_out, OUT_RTOL[torch.float32], "output")
    assert_close_rel(ssm_state, ref_ssm, 2e-5, "ssm state")
    assert_close_rel(conv_state, ref_conv, 1e-6, "conv state")
    assert (out[2] == 0).all()
    assert torch.equal(ssm_state[[1, 2, 4, 5, 7, 8, 10, 11, 12]], s["ssm_state"][[1, 2, 4, 5, 7, 8, 10, 11, 12]])


@pytest.mark.error_path
def test_decode_step_rejects_channel_mismatch():
    s = make_step(2, 1, 2, 16, 16, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="'mixed_qkv' must have 2\\*Hk\\*K \\+ Hv\\*V"):
        ops.gdn_decode_step(s["mixed_qkv"], s["conv_weight"], None, s["conv_state"], s["A_log"], s["dt_bias"],
                            s["a"], s["b"], s["ssm_state"], s["state_indices"], num_k_heads=2, head_k_dim=16,
                            head_v_dim=16)


def test_opcheck_gdn_decode_step():
    s = make_step(3, 1, 2, 16, 16, torch.bfloat16, torch.float32)
    out = torch.empty(3, 2, 16, dtype=torch.bfloat16)
    torch.library.opcheck(
        torch.ops.vllm_gdn_cpu.gdn_decode_step.default,
        (s["mixed_qkv"], s["conv_weight"], None, s["conv_state"], s["A_log"], s["dt_bias"], s["a"], s["b"],
         s["ssm_state"], s["state_indices"], 1, 16, 16, 0.25, True, False, 1.0, 20.0, out),
    )


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_decode_step_same_under_every_split(isa, state_dtype, monkeypatch):
    """The fused step runs the decode kernel's schedule (VLLM_GDN_CPU_DECODE_SPLIT / _CLAIM): whole
    heads and one-/two-vector V-blocks, static or dynamic, give the same outputs and states bit for
    bit (batch 1, GQA)."""
    s = make_step(1, 2, 4, 32, 128, torch.bfloat16, state_dtype, seed=2)
    results = {}
    with forced_isa(isa):
        for split in ("heads", "vblocks:16", "vblocks:32", "auto"):
            for claim in ("static", "dynamic"):
                monkeypatch.setenv("VLLM_GDN_CPU_DECODE_SPLIT", split)
                monkeypatch.setenv("VLLM_GDN_CPU_DECODE_CLAIM", claim)
                results[f"{split}/{claim}"] = fused(s)
    for split, got in results.items():
        for g, w in zip(got, results["heads/static"]):
            assert torch.equal(g, w), split
