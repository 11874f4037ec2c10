"""GDNCPUMambaMixer's core (vllm_gdn_cpu.layers.mamba1) on a hand-built step, without an engine.

One step of decodes + prefills (fresh, continuing from a state, a padding row with vLLM's
NULL_BLOCK_ID) through ``forward_core``, against the plain-torch references run sequence by
sequence in float64 (conv, x_proj / dt_proj with vLLM's ``_ssm_transform``, scan). Each named slot
must end holding the sequence's final conv history and SSM state (what vLLM's GPU path stores, and
what align-mode prefix caching reads back); no other slot may change; rows past the real tokens and
the padding row stay zero. Also: the layer refuses speculative decoding with a clear error.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="the layer subclasses vLLM's MambaMixer")

from vllm.model_executor.layers.mamba.mamba_mixer import MambaMixer  # noqa: E402

from vllm_gdn_cpu.layers import mamba1 as layer_module  # noqa: E402
from vllm_gdn_cpu.layers.mamba1 import GDNCPUMambaMixer  # noqa: E402
from vllm_gdn_cpu.reference import causal_conv1d_ref, selective_scan_ref  # noqa: E402

pytestmark = pytest.mark.vllm

DM, N, R, W = 48, 16, 6, 4  # d_inner (not a multiple of the vector width), d_state, dt rank, conv width
NUM_SLOTS = 12
NULL_BLOCK = 0  # vLLM's NULL_BLOCK_ID: padding rows carry it


class Linear:
    """A vLLM linear module's call convention: (output, bias when skip_bias_add else None)."""

    def __init__(self, weight, bias=None, skip_bias_add=False):
        self.weight, self.bias, self.skip_bias_add = weight, bias, skip_bias_add

    def __call__(self, x):
        bias = None if self.skip_bias_add else self.bias
        out = torch.nn.functional.linear(x, self.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return out, (self.bias if self.skip_bias_add else None)


class FakeMixer:
    """The attributes and methods of GDNCPUMambaMixer that forward_core uses, with random weights
    (no vLLM config or process group needed)."""

    forward_core = GDNCPUMambaMixer.forward_core
    _state_views = GDNCPUMambaMixer._state_views
    _dt_bias = GDNCPUMambaMixer._dt_bias
    _ssm_transform = MambaMixer._ssm_transform
    _conv_weight_for_ops = GDNCPUMambaMixer._conv_weight_for_ops
    _plain_conv_weight = GDNCPUMambaMixer._plain_conv_weight

    def __init__(self, generator, dim_first: bool, dtype: torch.dtype):
        self.prefix, self.activation = "fake.mixer", "silu"
        self.time_step_rank, self.ssm_state_size, self.use_rms_norm, self.is_lora_enabled = R, N, False, False
        self.conv1d = SimpleNamespace(
            weight=(torch.randn(DM, 1, W, generator=generator) * 0.5).to(dtype),
            bias=(torch.randn(DM, generator=generator) * 0.1).to(dtype),
        )
        self.x_proj = Linear((torch.randn(R + 2 * N, DM, generator=generator) / DM**0.5).to(dtype))
        self.dt_proj = Linear((torch.randn(DM, R, generator=generator) / R**0.5).to(dtype),
                              torch.empty(DM).uniform_(-4.0, 0.0, generator=generator), skip_bias_add=True)
        self.A = -torch.empty(DM, N).uniform_(0.05, 4.0, generator=generator)
        self.D = torch.randn(DM, generator=generator).to(dtype)
        conv = torch.randn(NUM_SLOTS, W - 1, DM, generator=generator).to(dtype)
        # DS layout: the cache block is (dim, state_len); the layer takes a transposed view.
        conv = conv.transpose(1, 2).contiguous() if dim_first else conv
        self.kv_cache = (conv, torch.randn(NUM_SLOTS, DM, N, generator=generator))


def conv_view(mixer):
    conv = mixer.kv_cache[0]
    return conv.transpose(1, 2) if conv.shape[1] != W - 1 else conv


def reference_sequence(mixer, x, gate, conv_state, ssm_state, has_init):
    """One sequence from (conv_state [W-1, Dm], ssm_state [Dm, N]) or zeros: (y [L, Dm], new conv
    state, new ssm state), in float64."""
    f64 = torch.float64
    conv = conv_state.to(f64).clone()[None]
    ssm = ssm_state.to(f64).clone()[None]
    slots = torch.zeros(1, dtype=torch.int32)
    cu = torch.tensor([0, x.shape[0]], dtype=torch.int32)
    init = torch.tensor([has_init])
    conv_out = causal_conv1d_ref(x, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, conv, slots, cu, init, True,
                                 compute_dtype=f64).to(f64)
    params = torch.nn.functional.linear(conv_out, mixer.x_proj.weight.to(f64))
    dt_in, B, C = torch.split(params, [R, N, N], dim=-1)
    dt = torch.nn.functional.linear(dt_in, mixer.dt_proj.weight.to(f64))
    y = selective_scan_ref(conv_out, dt, mixer.A, B, C, mixer.D, gate, mixer.dt_proj.bias, ssm, slots, cu,
                           has_initial_state=init, compute_dtype=f64)
    return y, conv[0], ssm[0]


@pytest.mark.parametrize("step", ["mixed", "decode_only", "prefill_only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dim_first", [False, True], ids=["SD", "DS"])
def test_forward_core_decode_and_prefill(monkeypatch, dim_first, dtype, step):
    monkeypatch.setattr(layer_module, "is_conv_state_dim_first", lambda: dim_first)
    generator = torch.Generator().manual_seed(0)
    mixer = FakeMixer(generator, dim_first, dtype)
    decode_slots = [1, NULL_BLOCK, 2]  # the middle decode row is padding
    prefills = [  # (length, slot, has_initial_state)
        (37, 3, False),  # fresh prompt
        (20, 4, True),  # chunked-prefill continuation / prefix-cache hit
        (2, 5, True),  # continuation shorter than the conv history (W-1 = 3)
        (5, 6, False),  # short fresh prompt
    ]
    if step == "decode_only":
        prefills = []
    elif step == "prefill_only":
        decode_slots = []
    lengths = [1] * len(decode_slots) + [p[0] for p in prefills]
    real = sum(lengths)
    total = real + 3  # + rows past the real tokens
    projected = torch.randn(total, 2 * DM, generator=generator).to(dtype)
    output = torch.zeros(total, DM, dtype=dtype)
    conv_before = conv_view(mixer).clone()
    ssm_before = mixer.kv_cache[1].clone()

    cu_p = torch.tensor([0] + [sum(p[0] for p in prefills[: i + 1]) for i in range(len(prefills))], dtype=torch.int32)
    # vLLM's metadata: the tensors of an absent row kind are None
    metadata = SimpleNamespace(
        num_decodes=len(decode_slots), num_decode_tokens=len(decode_slots),
        num_prefills=len(prefills), num_prefill_tokens=int(cu_p[-1]),
        state_indices_tensor_d=torch.tensor(decode_slots, dtype=torch.int32)[:, None] if decode_slots else None,
        state_indices_tensor_p=torch.tensor([p[1] for p in prefills], dtype=torch.int32) if prefills else None,
        query_start_loc_p=cu_p if prefills else None,
        has_initial_states_p=torch.tensor([p[2] for p in prefills]) if prefills else None,
    )
    mixer.forward_core(projected, output, metadata)

    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    conv_after, ssm_after = conv_view(mixer), mixer.kv_cache[1]
    rows = [(slot, True) for slot in decode_slots] + [(p[1], p[2]) for p in prefills]
    starts = [0] + torch.tensor(lengths).cumsum(0).tolist()
    touched = set()
    for (slot, has_init), s, e in zip(rows, starts[:-1], starts[1:]):
        if slot == NULL_BLOCK:
            assert not output[s:e].any(), "a padding row got output"
            continue
        touched.add(slot)
        y, conv_ref, ssm_ref = reference_sequence(
            mixer, projected[s:e, :DM], projected[s:e, DM:], conv_before[slot], ssm_before[slot], has_init)
        torch.testing.assert_close(output[s:e].double(), y, **tol, msg=f"output of the row in slot {slot}")
        torch.testing.assert_close(conv_after[slot].double(), conv_ref, **tol, msg=f"conv state of slot {slot}")
        torch.testing.assert_close(ssm_after[slot].double(), ssm_ref, **tol, msg=f"ssm state of slot {slot}")
    assert not output[real:].any(), "rows past the real tokens were written"
    for slot in set(range(NUM_SLOTS)) - touched:
        assert torch.equal(conv_after[slot], conv_before[slot]), f"conv slot {slot} changed"
        assert torch.equal(ssm_after[slot], ssm_before[slot]), f"ssm slot {slot} changed"


def test_speculative_decoding_is_refused(monkeypatch):
    """vLLM's MambaMixer has no speculative decode path; the layer refuses at build time with an
    error that says what to do instead of producing wrong tokens."""
    def fake_init(self, *args, **kwargs):
        self.activation, self.prefix = "silu", "model.layers.0.mixer"

    monkeypatch.setattr(MambaMixer, "__init__", fake_init)
    config = SimpleNamespace(num_speculative_tokens=3, cache_config=SimpleNamespace(use_replayssm=False))
    monkeypatch.setattr(layer_module, "get_current_vllm_config", lambda: config)
    with pytest.raises(NotImplementedError, match="speculative decoding of Mamba-1 layers.*--speculative-config"):
        GDNCPUMambaMixer()
