"""GDNCPUMambaMixer2's core (vllm_gdn_cpu.layers.mamba2) on a hand-built step, without an engine.

One step of decodes + prefills (fresh, continuing from a state, with and without an align-mode
prefill checkpoint, one checkpoint shorter than the conv history) through ``forward_core``, against
the plain-torch references run sequence by sequence in float64. The checkpoint slots must hold what
a sequence's states are after the first ``offset`` tokens of its query (vLLM's
``store_prefill_checkpoint``: SSM state, and the W-1 pre-conv inputs before the offset as conv
state); no other slot may change.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="the layer subclasses vLLM's MambaMixer2")

from vllm_gdn_cpu.layers import mamba2 as layer_module  # noqa: E402
from vllm_gdn_cpu.layers.mamba2 import GDNCPUMambaMixer2  # noqa: E402
from vllm_gdn_cpu.reference import causal_conv1d_ref, mamba2_chunk_scan_ref  # noqa: E402

pytestmark = pytest.mark.vllm

H, P, G, N, W = 4, 16, 2, 8, 4
INTER = H * P
CONV_DIM = INTER + 2 * G * N
NUM_SLOTS = 12
NULL_BLOCK = 0  # vLLM's NULL_BLOCK_ID, the checkpoint slot of rows without a checkpoint


class FakeMixer:
    """The attributes and methods of GDNCPUMambaMixer2 that forward_core uses, with random weights
    (no vLLM config or process group needed)."""

    forward_core = GDNCPUMambaMixer2.forward_core
    _state_views = GDNCPUMambaMixer2._state_views
    _split_heads = GDNCPUMambaMixer2._split_heads
    _checkpoint_conv_history = GDNCPUMambaMixer2._checkpoint_conv_history
    _spec_decode_core = GDNCPUMambaMixer2._spec_decode_core
    num_spec = 0
    _conv_weight_for_ops = GDNCPUMambaMixer2._conv_weight_for_ops
    _plain_conv_weight = GDNCPUMambaMixer2._plain_conv_weight

    def __init__(self, generator, dim_first: bool):
        self.prefix, self.activation, self.tp_size = "fake.mixer", "silu", 1
        self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size = H, P, G, N
        self.conv_kernel_size = W
        self.tped_intermediate_size, self.tped_conv_size, self.tped_dt_size = INTER, CONV_DIM, H
        self.split_hidden_states_B_C_fn = lambda t: torch.split(t, [INTER, G * N, G * N], dim=-1)
        self.conv1d = SimpleNamespace(
            weight=torch.randn(CONV_DIM, 1, W, generator=generator) * 0.5,
            bias=torch.randn(CONV_DIM, generator=generator) * 0.1,
        )
        self.A = -torch.empty(H).uniform_(0.1, 3.0, generator=generator)
        self.D = torch.randn(H, generator=generator)
        self.dt_bias = torch.randn(H, generator=generator) * 0.5
        conv = torch.randn(NUM_SLOTS, W - 1, CONV_DIM, generator=generator)
        # DS layout: the cache block is (dim, state_len); the layer takes a transposed view.
        conv = conv.transpose(1, 2).contiguous() if dim_first else conv
        self.kv_cache = (conv, torch.randn(NUM_SLOTS, H, P, N, generator=generator))


def conv_view(mixer):
    conv = mixer.kv_cache[0]
    return conv.transpose(1, 2) if conv.shape[1] != W - 1 else conv


def reference_sequence(mixer, xbc, dt, conv_state, ssm_state, has_init):
    """One sequence from (conv_state [W-1, D], ssm_state [H, P, N]) or zeros: (y [L, H, P],
    new conv state, new ssm state), in float64."""
    f64 = torch.float64
    conv = conv_state.to(f64).clone()[None]
    ssm = ssm_state.to(f64).clone()[None]
    slots = torch.zeros(1, dtype=torch.int32)
    cu = torch.tensor([0, xbc.shape[0]], dtype=torch.int32)
    init = torch.tensor([has_init])
    conv_out = causal_conv1d_ref(xbc, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, conv, slots, cu,
                                 init, True, compute_dtype=f64)
    x, B, C = torch.split(conv_out, [INTER, G * N, G * N], dim=-1)
    y = mamba2_chunk_scan_ref(x.unflatten(-1, (H, P)), dt, mixer.A, B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)),
                              mixer.D, mixer.dt_bias, ssm, slots, cu, has_initial_state=init, compute_dtype=f64)
    return y, conv[0], ssm[0]


@pytest.mark.parametrize("dim_first", [False, True], ids=["SD", "DS"])
def test_forward_core_decode_prefill_checkpoints(monkeypatch, dim_first):
    monkeypatch.setattr(layer_module, "is_conv_state_dim_first", lambda: dim_first)
    generator = torch.Generator().manual_seed(0)
    mixer = FakeMixer(generator, dim_first)
    # Two decodes (slots 1, 2), then prefills: (length, slot, has_initial_state, offset, ckpt slot)
    decode_slots = [1, 2]
    prefills = [
        (37, 3, False, 16, 7),  # fresh prompt, checkpoint at a block boundary
        (20, 4, True, 2, 8),  # continuation, checkpoint shorter than the conv history (W-1 = 3)
        (9, 5, True, 0, NULL_BLOCK),  # continuation without checkpoint
        (5, 6, False, 0, NULL_BLOCK),  # short fresh prompt without checkpoint
    ]
    lengths = [1] * len(decode_slots) + [p[0] for p in prefills]
    total = sum(lengths) + 3  # + padding rows past the real tokens
    projected = torch.randn(total, INTER + CONV_DIM + H, generator=generator)
    output = torch.zeros(total, INTER)
    conv_before = conv_view(mixer).clone()
    ssm_before = mixer.kv_cache[1].clone()

    cu_p = torch.tensor([0] + torch.tensor([p[0] for p in prefills]).cumsum(0).tolist(), dtype=torch.int32)
    metadata = SimpleNamespace(
        num_decodes=len(decode_slots), num_decode_tokens=len(decode_slots),
        num_prefills=len(prefills), num_prefill_tokens=int(cu_p[-1]),
        state_indices_tensor_d=torch.tensor(decode_slots, dtype=torch.int32)[:, None],
        state_indices_tensor_p=torch.tensor([p[1] for p in prefills], dtype=torch.int32),
        query_start_loc_p=cu_p,
        has_initial_states_p=torch.tensor([p[2] for p in prefills]),
        checkpoint_meta=SimpleNamespace(
            checkpoint_offsets=torch.tensor([p[3] for p in prefills], dtype=torch.int32),
            state_indices=torch.tensor([p[4] for p in prefills], dtype=torch.int32),
        ),
    )
    mixer.forward_core(projected, output, metadata)

    xbc_all, dt_all = projected[:, INTER:INTER + CONV_DIM], projected[:, INTER + CONV_DIM:]
    rows = [(1, s, True, 0, None) for s in decode_slots] + prefills
    written = set()
    start = 0
    for length, slot, has_init, offset, ckpt_slot in rows:
        tokens = slice(start, start + length)
        y, conv, ssm = reference_sequence(mixer, xbc_all[tokens], dt_all[tokens], conv_before[slot],
                                          ssm_before[slot], has_init)
        torch.testing.assert_close(output[tokens].double(), y.flatten(1), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(conv_view(mixer)[slot].double(), conv, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mixer.kv_cache[1][slot].double(), ssm, rtol=1e-4, atol=1e-4)
        written.add(slot)
        if offset:
            head = slice(start, start + offset)
            _, conv_ck, ssm_ck = reference_sequence(mixer, xbc_all[head], dt_all[head], conv_before[slot],
                                                    ssm_before[slot], has_init)
            torch.testing.assert_close(conv_view(mixer)[ckpt_slot].double(), conv_ck, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(mixer.kv_cache[1][ckpt_slot].double(), ssm_ck, rtol=1e-4, atol=1e-4)
            written.add(ckpt_slot)
        start += length
    assert output[start:].abs().max() == 0, "padding rows were written"
    for slot in set(range(NUM_SLOTS)) - written:  # NULL_BLOCK (0) and the unused slots
        assert torch.equal(conv_view(mixer)[slot], conv_before[slot]), f"conv slot {slot} changed"
        assert torch.equal(mixer.kv_cache[1][slot], ssm_before[slot]), f"ssm slot {slot} changed"


def test_checkpoint_history_ignores_garbage_of_slots_without_state():
    """A fresh row (no initial state) whose checkpoint is shorter than the conv history takes
    zeros for the positions before its query, even when its slot holds NaN garbage."""
    mixer = SimpleNamespace(conv_kernel_size=W)
    conv_state = torch.full((3, W - 1, 5), float("nan"))
    xbc = torch.arange(10.0)[:, None].expand(10, 5)
    rows, history = GDNCPUMambaMixer2._checkpoint_conv_history(
        mixer, xbc, conv_state, torch.tensor([1, 2], dtype=torch.int32), torch.tensor([0, 4, 10], dtype=torch.int32),
        torch.tensor([False, False]), torch.tensor([2, 0], dtype=torch.int32),
    )
    assert rows.tolist() == [0]
    assert history[0, :, 0].tolist() == [0.0, 0.0, 1.0]


def test_speculative_decode_rows(monkeypatch):
    """Speculative decode rows (``_spec_decode_core``): row i has q_i tokens (1 + drafts) and
    a_i = tokens accepted in its previous step. The SSM state starts from slot
    ``state_indices_d[i, a_i - 1]`` and the state after token t lands in ``state_indices_d[i, t]``;
    the conv history starts at column a_i - 1 of the rolling buffer (W-1+S columns, in slot
    ``state_indices_d[i, 0]``), which afterwards holds ``prior[1:] ++ tokens`` from column 0."""
    monkeypatch.setattr(layer_module, "is_conv_state_dim_first", lambda: False)
    generator = torch.Generator().manual_seed(1)
    spec = 3
    mixer = FakeMixer(generator, dim_first=False)
    mixer.num_spec = spec
    mixer.kv_cache = (torch.randn(NUM_SLOTS, W - 1 + spec, CONV_DIM, generator=generator), mixer.kv_cache[1])
    # Rows: 3 drafts after 2 accepted; 1 draft after all 4 accepted (state read from the last
    # column); no draft after 1 accepted; no draft, fresh columns. Unused columns name slot 0.
    spec_idx = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0], [11, 0, 0, 0]], dtype=torch.int32)
    lengths, accepted = [4, 2, 1, 1], [2, 4, 1, 1]
    total = sum(lengths)
    projected = torch.randn(total + 2, INTER + CONV_DIM + H, generator=generator)
    output = torch.zeros(total + 2, INTER)
    conv_before, ssm_before = mixer.kv_cache[0].clone(), mixer.kv_cache[1].clone()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    metadata = SimpleNamespace(
        num_decodes=len(lengths), num_decode_tokens=total, num_prefills=0, num_prefill_tokens=0,
        state_indices_tensor_d=spec_idx, query_start_loc_d=cu,
        num_accepted_tokens=torch.tensor(accepted, dtype=torch.int32),
    )
    mixer.forward_core(projected, output, metadata)

    xbc_all, dt_all = projected[:, INTER:INTER + CONV_DIM], projected[:, INTER + CONV_DIM:]
    for i, (q, a) in enumerate(zip(lengths, accepted)):
        tokens = slice(int(cu[i]), int(cu[i]) + q)
        base = int(spec_idx[i, 0])
        prior = conv_before[base, a - 1 : a - 1 + W - 1]
        y, _, _ = reference_sequence(mixer, xbc_all[tokens], dt_all[tokens], prior, ssm_before[int(spec_idx[i, a - 1])],
                                     True)
        torch.testing.assert_close(output[tokens].double(), y.flatten(1), rtol=1e-4, atol=1e-4)
        for t in range(q):
            head = slice(int(cu[i]), int(cu[i]) + t + 1)
            _, _, ssm_t = reference_sequence(mixer, xbc_all[head], dt_all[head], prior,
                                             ssm_before[int(spec_idx[i, a - 1])], True)
            torch.testing.assert_close(mixer.kv_cache[1][int(spec_idx[i, t])].double(), ssm_t, rtol=1e-4, atol=1e-4)
        rolled = torch.cat([prior[1:], xbc_all[tokens]])
        torch.testing.assert_close(mixer.kv_cache[0][base, : rolled.shape[0]], rolled)
    assert output[total:].abs().max() == 0
    # Slot 0 is named only in unused columns: untouched.
    assert torch.equal(mixer.kv_cache[1][0], ssm_before[0]) and torch.equal(mixer.kv_cache[0][0], conv_before[0])


@pytest.mark.error_path
@pytest.mark.parametrize(
    "settings, message",
    [
        # speculative decoding with prefix caching: fine (the plugin's align-mode copy stand-ins)
        (dict(num_spec=2, mamba_cache_mode="align"), None),
        (dict(use_replayssm=True), "--use-replayssm is not supported"),
        (dict(activation="gelu"), "unsupported MambaMixer2 conv activation 'gelu'"),
        (dict(num_spec=2, mamba_cache_mode="none"), None),  # speculative decoding without prefix caching: fine
        (dict(mamba_cache_mode="align"), None),
    ],
)
def test_layer_build_refuses_what_it_cannot_run(monkeypatch, settings, message):
    """The checks of GDNCPUMambaMixer2.__init__, with vLLM's MambaMixer2.__init__ replaced by a stub
    that sets the attributes they read (no vLLM config or process group needed)."""
    from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2

    def stub_init(self, *args, **kwargs):
        torch.nn.Module.__init__(self)
        self.prefix, self.activation = "model.layers.0.mixer", settings.get("activation", "silu")
        self.num_spec, self.use_replayssm = settings.get("num_spec", 0), settings.get("use_replayssm", False)
        self.cache_config = SimpleNamespace(mamba_cache_mode=settings.get("mamba_cache_mode", "none"))
        # Projection modules without a linear method: our small-batch engine is not installed on them.
        self.in_proj, self.out_proj = torch.nn.Identity(), torch.nn.Identity()

    monkeypatch.setattr(MambaMixer2, "__init__", stub_init)
    layer = torch.nn.Module.__new__(GDNCPUMambaMixer2)
    if message is None:
        GDNCPUMambaMixer2.__init__(layer)
    else:
        with pytest.raises(NotImplementedError, match=message):
            GDNCPUMambaMixer2.__init__(layer)
