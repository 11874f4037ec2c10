"""Mamba-1 selective-scan ops against the float64 token-by-token reference: selective_scan
(prefill) and selective_state_update (decode), on every ISA this machine has."""

import pytest
import torch

from gdn_cases import DTYPE_IDS, DTYPES, assert_close_rel, forced_isa, isas, torch_threads
from mamba1_cases import decode_and_compare, make_m1, prefill_and_compare
from vllm_gdn_cpu import ops
from vllm_gdn_cpu.reference import selective_scan_ref

# (seqlens, Dm, N): odd lengths around the kernel's 64-token chunk, varlen with length-1 sequences,
# Dm not a multiple of the vector width (37, 5), N = 16 (every released model), 1, 5 and 24.
SHAPES = [
    ([1], 16, 16),
    ([63], 37, 16),
    ([65, 1, 130], 80, 16),
    ([7, 64, 3], 37, 5),
    ([33], 5, 1),
    ([129, 2], 48, 24),
]


def shape_id(s):
    return "x".join(map(str, s[0])) + f"-d{s[1]}n{s[2]}"


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_prefill_fp32_all_isas(isa, shape):
    seqlens, Dm, N = shape
    p = make_m1(seqlens, Dm, N, torch.float32, torch.float32, strided=True)
    with forced_isa(isa):
        prefill_and_compare(p, label=isa)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("state_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_prefill_dtypes(dtype, state_dtype):
    p = make_m1([65, 1, 30], 37, 16, dtype, state_dtype, seed=1)
    prefill_and_compare(p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_fp32_B_C_and_dt_beside_narrow_x(dtype):
    """B, C may be fp32 beside bf16/fp16 x (and dt any float dtype), prefill and decode."""
    p = make_m1([40, 3], 37, 16, dtype, torch.float32, seed=2, bc_dtype=torch.float32)
    p.dt = p.dt.float()
    prefill_and_compare(p)
    q = make_m1([1] * 4, 37, 16, dtype, torch.float32, seed=3, bc_dtype=torch.float32)
    decode_and_compare(q)


@pytest.mark.parametrize("with_D", [True, False])
@pytest.mark.parametrize("with_z", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dt_softplus", [True, False])
def test_optional_inputs(with_D, with_z, with_bias, dt_softplus):
    p = make_m1([70, 9], 37, 16, torch.float32, torch.float32, seed=4, with_D=with_D, with_z=with_z,
                with_bias=with_bias)
    if not dt_softplus:  # raw step sizes must be >= 0 for a decaying scan
        p.dt = p.dt.abs() * 0.1
        p.dt_bias = None if p.dt_bias is None else p.dt_bias.abs()
    prefill_and_compare(p, dt_softplus=dt_softplus)
    q = make_m1([1] * 3, 37, 16, torch.float32, torch.float32, seed=5, with_D=with_D, with_z=with_z,
                with_bias=with_bias)
    if not dt_softplus:
        q.dt = q.dt.abs() * 0.1
        q.dt_bias = None if q.dt_bias is None else q.dt_bias.abs()
    decode_and_compare(q, dt_softplus=dt_softplus)


@pytest.mark.parametrize("isa", isas())
def test_prefill_padding_empty_and_initial_states(isa):
    """PAD entries (-1) touch no slot and output zeros; empty sequences write their (initial or
    zero) state; has_initial_state False starts from zeros without reading the slot (NaN there);
    slots not named stay bit-identical; rows past cu_seqlens[-1] are zero."""
    p = make_m1([70, 3, 0, 64, 9, 0, 4], 37, 16, torch.float32, torch.float32, seed=6)
    p.state_indices[1] = -1
    p.state_indices[5] = -1
    has_init = torch.tensor([True, True, False, False, True, True, False])
    p.state[p.state_indices[3]] = float("nan")  # has_initial_state False: must not be read
    p.kw = dict(has_initial_state=has_init)
    named = [s for s in p.state_indices.tolist() if s >= 0]
    untouched = [s for s in range(p.state.shape[0]) if s not in named]
    with forced_isa(isa):
        state, out = prefill_and_compare(p)
    cu = p.cu_seqlens.tolist()
    assert (out[cu[1] : cu[2]] == 0).all(), "padded sequence output must be zero"
    assert torch.equal(state[untouched], p.state[untouched]), "slots not named were modified"
    assert (state[p.state_indices[2]] == 0).all(), "empty sequence without initial state: zero state"
    assert torch.isfinite(state[p.state_indices[3]]).all(), "has_initial_state False read the slot"


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32)], ids=["f32", "bf16", "f16-f32"])
def test_prefill_checkpoints(dtype, state_dtype):
    """checkpoint_offsets: the state after o tokens goes to the checkpoint slot; offsets 1, the
    chunk boundary 64, mid-chunk, len, 0 (none); PAD entries write none."""
    seqlens = [150, 64, 100, 5, 70, 40]
    p = make_m1(seqlens, 37, 16, dtype, state_dtype, seed=7, extra_slots=8)
    offsets = torch.tensor([64, 1, 37, 5, 0, 40], dtype=torch.int32)  # 5 and 40: == len
    ck_slots = torch.tensor([0, 2, 4, 6, 8, 12], dtype=torch.int32)
    p.state_indices[5] = -1  # padding: its checkpoint slot (12) must stay untouched
    p.kw = dict(checkpoint_offsets=offsets, checkpoint_slots=ck_slots,
                has_initial_state=torch.tensor([True, False, True, True, True, True]))
    state, _ = prefill_and_compare(p)
    for slot in (8, 12, 13, 14):  # slot of offset 0, of the PAD entry, and spare ones
        assert torch.equal(state[slot], p.state[slot]), f"slot {slot} must be untouched"
    assert torch.equal(state[6], state[p.state_indices[3]])  # offset == len: the final state


def test_prefill_checkpoint_at_every_offset():
    """Every offset 0..len of one sequence crossing two chunk boundaries, against the reference;
    the checkpoint equals the final state of a prefill of the first o tokens."""
    L = 131
    p = make_m1([L], 37, 16, torch.float32, torch.float32, seed=8)
    for o in range(0, L + 1):
        p.kw = dict(checkpoint_offsets=torch.tensor([o], dtype=torch.int32),
                    checkpoint_slots=torch.tensor([0], dtype=torch.int32))
        state = p.state.clone()
        ops.selective_scan(*p.args(state), p.cu_seqlens, **p.kw)
        prefix = p.state.clone()
        r = slice(0, o)
        ops.selective_scan(p.x[r], p.dt[r], p.A, p.B[r], p.C[r], p.D, p.z[r], p.dt_bias, prefix, p.state_indices,
                           torch.tensor([0, o], dtype=torch.int32))
        if o == 0:
            assert torch.equal(state[0], p.state[0]), "offset 0 writes no checkpoint"
        else:
            assert torch.equal(state[0], prefix[1]), f"checkpoint at {o} != state of the first {o} tokens"
        if o in (1, 63, 64, 65, 128, L):
            prefill_and_compare(p, label=f"offset {o}")


@pytest.mark.parametrize("isa", isas())
def test_extreme_decays(isa):
    """dt A down to -1e4 per token (and dt 30: softplus linear): everything finite, decays underflow
    to zero instead of overflowing; prefill and decode."""
    p = make_m1([100, 64], 37, 16, torch.float32, torch.float32, seed=9)
    p.A[::3] *= 1e4 / p.A[::3].abs().max()
    p.dt = torch.full_like(p.dt, 1.0)
    p.dt[::7] = 30.0
    q = make_m1([1] * 5, 37, 16, torch.float32, torch.float32, seed=10)
    q.A = p.A
    q.dt = torch.full_like(q.dt, 30.0)
    with forced_isa(isa):
        state, out = prefill_and_compare(p, label=isa)
        assert torch.isfinite(state).all() and torch.isfinite(out).all()
        state, out = decode_and_compare(q, label=isa)
        assert torch.isfinite(state).all() and torch.isfinite(out).all()


def test_threads_bit_identical():
    """Channels are grouped into tasks by the thread count: the results must not depend on it."""
    p = make_m1([130, 3, 64], 200, 16, torch.bfloat16, torch.float32, seed=11)
    q = make_m1([1] * 3, 200, 16, torch.bfloat16, torch.float32, seed=12)
    results = []
    for threads in (1, 2, 3, 5):
        with torch_threads(threads):
            state = p.state.clone()
            out = ops.selective_scan(*p.args(state), p.cu_seqlens)
            dstate = q.state.clone()
            dout = ops.selective_state_update(*q.args(dstate))
            results.append((out, state, dout, dstate))
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


def test_prefill_split_in_two_calls_equals_one():
    """Prefix then rest (continuing from the state) == one call."""
    p = make_m1([150, 70], 37, 16, torch.float32, torch.float32, seed=13)
    state_one = p.state.clone()
    out_one = ops.selective_scan(*p.args(state_one), p.cu_seqlens)
    cuts = [100, 30]
    state = p.state.clone()
    out_two = torch.empty_like(out_one)
    for part in range(2):
        rows, lens = [], []
        for i, (s, e) in enumerate([(0, 150), (150, 220)]):
            a, b = (s, s + cuts[i]) if part == 0 else (s + cuts[i], e)
            rows.append(torch.arange(a, b))
            lens.append(b - a)
        r = torch.cat(rows)
        cu = torch.tensor([0, lens[0], lens[0] + lens[1]], dtype=torch.int32)
        out_two[r] = ops.selective_scan(p.x[r], p.dt[r], p.A, p.B[r], p.C[r], p.D, p.z[r], p.dt_bias, state,
                                        p.state_indices, cu)
    assert torch.equal(out_two, out_one)
    assert torch.equal(state, state_one)


@pytest.mark.parametrize("state_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_decode_steps_equal_prefill(state_dtype):
    """A prefill of 6 tokens == 6 decode steps (fp32 state: to fp32 rounding; narrow states round
    once per step in decode but once per sequence in prefill)."""
    p = make_m1([6, 6], 37, 16, torch.float32, state_dtype, seed=14)
    s_pre = p.state.clone()
    y_pre = ops.selective_scan(*p.args(s_pre), p.cu_seqlens)
    s_dec = p.state.clone()
    y_dec = torch.empty_like(y_pre)
    for t in range(6):
        r = torch.tensor([t, 6 + t])
        y_dec[r] = ops.selective_state_update(p.x[r], p.dt[r], p.A, p.B[r], p.C[r], p.D, p.z[r], p.dt_bias, s_dec,
                                              p.state_indices)
    tol = 1e-5 if state_dtype == torch.float32 else 2e-2
    assert_close_rel(y_dec, y_pre, tol, "output")
    assert_close_rel(s_dec, s_pre, tol, "states")


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("batch,Dm,N", [(1, 16, 16), (5, 37, 16), (3, 80, 5), (4, 33, 1), (2, 40, 24)])
def test_decode_all_isas(isa, batch, Dm, N):
    p = make_m1([1] * batch, Dm, N, torch.float32, torch.float32, seed=20, strided=True)
    with forced_isa(isa):
        decode_and_compare(p, label=isa)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch,Dm,N", [(1, 300, 16), (3, 5, 16), (2, 131, 32), (1, 72, 17)])
def test_decode_channel_groups(isa, state_dtype, batch, Dm, N):
    """The decode's 16-channel groups (N = 16 with AVX-512: y of 16 rows summed in registers):
    blocks of several groups ending in a part group (300 channels in 48-channel blocks at batch 1,
    two threads and more), fewer channels than a group (5), and the row loop beside it (N 32, 17)."""
    p = make_m1([1] * batch, Dm, N, torch.bfloat16, state_dtype, seed=21, strided=True)
    with forced_isa(isa), torch_threads(2):
        decode_and_compare(p, label=isa)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("state_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_decode_dtypes(dtype, state_dtype):
    p = make_m1([1] * 6, 37, 16, dtype, state_dtype, seed=21)
    decode_and_compare(p)


def test_decode_padding_untouched_slots():
    p = make_m1([1] * 5, 300, 16, torch.bfloat16, torch.bfloat16, seed=22)
    p.state_indices[2] = -1
    named = [s for s in p.state_indices.tolist() if s >= 0]
    untouched = [s for s in range(p.state.shape[0]) if s not in named]
    state, out = decode_and_compare(p)
    assert (out[2] == 0).all()
    assert torch.equal(state[untouched], p.state[untouched])


def test_out_argument_and_trailing_rows():
    """out= is written (strided rows allowed); tokens after cu_seqlens[-1] get zero output."""
    p = make_m1([10, 20], 37, 16, torch.float32, torch.float32, seed=23)
    cu = torch.tensor([0, 10, 25], dtype=torch.int32)  # last 5 tokens belong to no sequence
    out = torch.full((30, 50), 7.0)[:, :37]
    res = ops.selective_scan(*p.args(p.state.clone()), cu, out=out)
    assert res is out
    assert (out[25:] == 0).all()
    expected = selective_scan_ref(*p.args(p.state.double()), cu, compute_dtype=torch.float64)
    assert_close_rel(out, expected, 5e-5, "output")


def test_mamba_2p8b_shape():
    """The Mamba-2.8B shape (Dm 5120, N 16) with bf16 activations and fp32 state, prefill and decode."""
    p = make_m1([300, 17], 5120, 16, torch.bfloat16, torch.float32, seed=24)
    prefill_and_compare(p)
    q = make_m1([1] * 8, 5120, 16, torch.bfloat16, torch.bfloat16, seed=25)
    decode_and_compare(q)
