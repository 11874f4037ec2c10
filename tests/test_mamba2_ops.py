"""Mamba2 (SSD) ops against the float64 token-by-token reference: mamba2_chunk_scan (prefill) and
mamba2_state_update (decode), on every ISA and GEMM path this machine has."""

import math

import pytest
import torch

from gdn_cases import DTYPE_IDS, DTYPES, assert_close_rel, forced_gemm, forced_isa, gemms, isas, torch_threads
from mamba2_cases import decode_and_compare, make_m2, prefill_and_compare
from vllm_gdn_cpu import ops
from vllm_gdn_cpu.reference import mamba2_chunk_scan_ref

# (seqlens, H, P, G, N): odd lengths and chunk boundaries (63/64/65, 129, 200), varlen with length-1
# sequences, G = 1 and G > 1, head dims and d_state that are not multiples of the vector width.
SHAPES = [
    ([1], 4, 16, 1, 16),
    ([63], 4, 32, 2, 32),
    ([64], 2, 64, 1, 128),
    ([65], 6, 16, 3, 24),
    ([200], 4, 24, 2, 40),
    ([1, 64, 5, 129, 1], 8, 32, 2, 64),
    ([17, 1, 130], 2, 40, 1, 16),
]


def shape_id(s):
    return "x".join(map(str, s[0])) + f"-h{s[1]}p{s[2]}-g{s[3]}n{s[4]}"


def test_chunked_reference_equals_recurrence():
    """The chunked SSD form (the kernel's algorithm) equals the token-by-token recurrence, with
    chunk ends forced by checkpoints, in float64."""
    p = make_m2([150, 3, 64, 0, 77], 4, 8, 2, 16, torch.float64, torch.float64, seed=11, with_z=True)
    p.kw = dict(checkpoint_offsets=torch.tensor([37, 1, 64, 0, 77], dtype=torch.int32),
                checkpoint_slots=torch.tensor([0, 2, 4, 6, 10], dtype=torch.int32),
                has_initial_state=torch.tensor([True, False, True, True, False]))
    results = []
    for chunked in (None, 16, 64):
        state = p.state.clone()
        y = mamba2_chunk_scan_ref(*p.args(state), p.cu_seqlens, z=p.z, compute_dtype=torch.float64,
                                  chunked=chunked, **p.kw)
        results.append((y, state))
    for y, state in results[1:]:
        torch.testing.assert_close(y, results[0][0], rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(state, results[0][1], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_prefill_fp32_all_isas(isa, shape):
    seqlens, H, P, G, N = shape
    p = make_m2(seqlens, H, P, G, N, torch.float32, torch.float32, strided=True, with_z=True)
    with forced_isa(isa):
        prefill_and_compare(p, label=isa)


# The chunk is 128 tokens with bf16 products, 64 otherwise: lengths around both.
GEMM_SHAPES = [([1, 64, 5, 130, 37], 8, 64, 2, 128), ([127, 128, 257], 4, 48, 1, 40)]


@pytest.mark.parametrize("gemm", gemms())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=shape_id)
def test_prefill_every_gemm_path(gemm, dtype, shape):
    seqlens, H, P, G, N = shape
    p = make_m2(seqlens, H, P, G, N, dtype, torch.float32, seed=7, strided=True)
    with forced_gemm(gemm):
        prefill_and_compare(p, label=gemm)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("state_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_prefill_dtypes(dtype, state_dtype):
    p = make_m2([65, 1, 130], 4, 32, 2, 64, dtype, state_dtype, seed=1, with_z=True)
    prefill_and_compare(p)


@pytest.mark.parametrize("with_D", [True, False])
@pytest.mark.parametrize("with_z", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_prefill_optional_inputs(with_D, with_z, with_bias):
    p = make_m2([70, 9], 4, 16, 2, 32, torch.float32, torch.float32, seed=2, with_D=with_D, with_z=with_z,
                with_bias=with_bias)
    prefill_and_compare(p)


@pytest.mark.parametrize("isa", isas())
def test_prefill_padding_empty_and_initial_states(isa):
    """PAD entries (-1) touch no slot and output zeros; empty sequences write their (initial or
    zero) state; has_initial_state False starts from zeros without reading the slot (NaN there);
    slots not named stay bit-identical."""
    p = make_m2([70, 3, 0, 64, 9, 0], 4, 32, 2, 32, torch.float32, torch.float32, seed=3, with_z=True)
    p.state_indices[1] = -1
    p.state_indices[5] = -1
    has_init = torch.tensor([True, True, False, False, True, True])
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
    assert not torch.equal(state[p.state_indices[4]], p.state[p.state_indices[4]])  # 9 tokens moved it


@pytest.mark.parametrize("gemm", gemms()[:2])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["f32", "bf16"])
def test_prefill_checkpoints(gemm, dtype, state_dtype):
    """checkpoint_offsets: a chunk ends at the offset and that state goes to the checkpoint slot;
    offsets 1, a chunk boundary (128: both chunk lengths), mid-chunk, len, 0 (none); PAD entries
    write none."""
    seqlens = [300, 64, 100, 5, 70, 40]
    p = make_m2(seqlens, 4, 32, 1, 48, dtype, state_dtype, seed=4, extra_slots=8)
    offsets = torch.tensor([128, 1, 37, 5, 0, 40], dtype=torch.int32)  # 5 and 40: == len
    ck_slots = torch.tensor([0, 2, 4, 6, 8, 12], dtype=torch.int32)
    p.state_indices[5] = -1  # padding: its checkpoint slot (12) must stay untouched
    p.kw = dict(checkpoint_offsets=offsets, checkpoint_slots=ck_slots,
                has_initial_state=torch.tensor([True, False, True, True, True, True]))
    with forced_gemm(gemm):
        state, _ = prefill_and_compare(p, label=gemm)
    for slot in (8, 12, 13, 14):  # slot of offset 0, of the PAD entry, and spare ones
        assert torch.equal(state[slot], p.state[slot]), f"slot {slot} must be untouched"
    # offset == len: the checkpoint holds the final state
    assert torch.equal(state[6], state[p.state_indices[3]])


def test_prefill_checkpoint_at_every_offset():
    """Every offset 1..len of one sequence crossing two chunk boundaries, against the reference."""
    L = 131
    p = make_m2([L], 2, 16, 1, 16, torch.float32, torch.float32, seed=5)
    for o in [1, 2, 31, 63, 64, 65, 100, 127, 128, 129, 130, 131]:
        p.kw = dict(checkpoint_offsets=torch.tensor([o], dtype=torch.int32),
                    checkpoint_slots=torch.tensor([0], dtype=torch.int32))
        prefill_and_compare(p, label=f"offset {o}")


@pytest.mark.parametrize("dt_softplus,dt_limit", [(True, (0.0, math.inf)), (True, (0.05, 0.4)),
                                                  (False, (0.0, math.inf)), (False, (0.1, 2.0))])
def test_prefill_dt_options(dt_softplus, dt_limit):
    p = make_m2([90, 7], 4, 16, 2, 32, torch.float32, torch.float32, seed=6)
    if not dt_softplus:
        p.dt = p.dt.abs()
    prefill_and_compare(p, dt_softplus=dt_softplus, dt_limit=dt_limit)


@pytest.mark.parametrize("gemm", gemms())
def test_prefill_extreme_decays(gemm):
    """A*dt down to -1e4 per token (and sums to -1e6 over a chunk): everything finite, decays
    underflow to zero instead of overflowing."""
    p = make_m2([100, 64], 4, 16, 1, 16, torch.float32, torch.float32, seed=8)
    p.A = torch.tensor([-1e4, -1e2, -1.0, -1e-3])
    p.dt = torch.full_like(p.dt, 1.0)
    p.dt[::7] = 30.0  # softplus linear above 20: A dt = -3e5 on those tokens
    with forced_gemm(gemm):
        state, out = prefill_and_compare(p, label=gemm)
    assert torch.isfinite(state).all() and torch.isfinite(out).all()


def test_prefill_threads_and_grouping_bit_identical():
    """Heads run in tasks of several heads (sharing C B^T) or one each, depending on the thread
    count: the results must not depend on it."""
    p = make_m2([130, 3, 64], 16, 32, 2, 32, torch.bfloat16, torch.float32, seed=9, with_z=True)
    results = []
    for threads in (1, 2, 3, 5):
        with torch_threads(threads):
            state = p.state.clone()
            out = ops.mamba2_chunk_scan(*p.args(state), p.cu_seqlens, z=p.z)
            results.append((out, state))
    for out, state in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(state, results[0][1])


def test_prefill_split_in_two_calls_equals_one():
    """Prefix then rest (continuing from the state) == one call."""
    p = make_m2([150, 70], 4, 32, 2, 32, torch.float32, torch.float32, seed=10, with_z=True)
    state_one = p.state.clone()
    out_one = ops.mamba2_chunk_scan(*p.args(state_one), p.cu_seqlens, z=p.z)
    # first call: tokens [0, 100) of seq 0 and [150, 180) of seq 1
    cuts = [100, 30]
    state = p.state.clone()
    outs = []
    for part in range(2):
        rows, lens = [], []
        for i, (s, e) in enumerate([(0, 150), (150, 220)]):
            a, b = (s, s + cuts[i]) if part == 0 else (s + cuts[i], e)
            rows.append(torch.arange(a, b))
            lens.append(b - a)
        r = torch.cat(rows)
        cu = torch.tensor([0, lens[0], lens[0] + lens[1]], dtype=torch.int32)
        outs.append((r, ops.mamba2_chunk_scan(p.x[r], p.dt[r], p.A, p.B[r], p.C[r], p.D, p.dt_bias, state,
                                              p.state_indices, cu, z=p.z[r])))
    out_two = torch.empty_like(out_one)
    for r, o in outs:
        out_two[r] = o
    assert_close_rel(out_two, out_one, 2e-6, "output")
    assert_close_rel(state, state_one, 2e-6, "states")


def test_prefill_out_argument_and_trailing_rows():
    """out= is written (strided heads allowed); tokens after cu_seqlens[-1] get zero output."""
    p = make_m2([10, 20], 2, 16, 1, 16, torch.float32, torch.float32, seed=12)
    cu = torch.tensor([0, 10, 25], dtype=torch.int32)  # last 5 tokens belong to no sequence
    out = torch.full((30, 2, 24), 7.0)[:, :, :16]
    res = ops.mamba2_chunk_scan(*p.args(p.state.clone()), cu, out=out)
    assert res is out
    assert (out[25:] == 0).all()
    expected = mamba2_chunk_scan_ref(*p.args(p.state.double()), cu, compute_dtype=torch.float64)
    assert_close_rel(out, expected, 5e-5, "output")


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("batch,H,P,G,N", [(1, 8, 64, 1, 128), (5, 4, 16, 2, 24), (16, 6, 40, 3, 64)])
def test_decode_all_isas(isa, batch, H, P, G, N):
    p = make_m2([1] * batch, H, P, G, N, torch.float32, torch.float32, seed=20, strided=True, with_z=True)
    with forced_isa(isa):
        decode_and_compare(p, label=isa)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("state_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_decode_dtypes(dtype, state_dtype):
    p = make_m2([1] * 6, 4, 32, 2, 64, dtype, state_dtype, seed=21, with_z=True)
    decode_and_compare(p)


@pytest.mark.parametrize("dt_softplus,dt_limit", [(True, (0.0, math.inf)), (False, (0.1, 2.0))])
def test_decode_options_padding_and_extreme_decays(dt_softplus, dt_limit):
    p = make_m2([1] * 5, 4, 16, 1, 32, torch.float32, torch.float32, seed=22, with_D=False, with_bias=False)
    p.A = torch.tensor([-1e4, -1e2, -1.0, -1e-3])
    p.dt = p.dt.abs() * 10
    p.state_indices[2] = -1
    named = [s for s in p.state_indices.tolist() if s >= 0]
    untouched = [s for s in range(p.state.shape[0]) if s not in named]
    state, out = decode_and_compare(p, dt_softplus=dt_softplus, dt_limit=dt_limit)
    assert (out[2] == 0).all()
    assert torch.equal(state[untouched], p.state[untouched])


@pytest.mark.parametrize("state_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_decode_equals_prefill_of_length_one(state_dtype):
    p = make_m2([1] * 4, 4, 32, 2, 32, torch.float32, state_dtype, seed=23, with_z=True)
    s_dec, s_pre = p.state.clone(), p.state.clone()
    y_dec = ops.mamba2_state_update(*p.args(s_dec), z=p.z)
    y_pre = ops.mamba2_chunk_scan(*p.args(s_pre), p.cu_seqlens, z=p.z)
    tol = 1e-6 if state_dtype == torch.float32 else 1e-2
    assert_close_rel(y_dec, y_pre, tol, "output")
    assert_close_rel(s_dec, s_pre, tol, "states")


# ----------------------------------------------------------------------------- vs vLLM's CPU ops


def _vllm_ops():
    pytest.importorskip("vllm", reason="cross-check against vLLM's own CPU ops needs vLLM")
    import vllm._custom_ops  # noqa: F401  (loads vllm._C)

    return torch.ops._C


@pytest.mark.vllm
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_prefill_matches_vllm_cpu_op(dtype):
    """vLLM's mamba_chunk_scan_fwd_cpu(out, states, x, dt (final), A, B, C, D, z, cu_seqlens) with
    fp32 states in and out: same semantics (softplus and bias applied before it, as its wrapper does)."""
    C_ops = _vllm_ops()
    p = make_m2([70, 5, 130], 4, 32, 2, 64, dtype, torch.float32, seed=30, with_z=True)
    dt_final = torch.nn.functional.softplus(p.dt.float() + p.dt_bias)
    states = p.state[p.state_indices.long()].clone()
    out_v = torch.empty_like(p.x)
    C_ops.mamba_chunk_scan_fwd_cpu(out_v, states, p.x, dt_final, p.A, p.B, p.C, p.D, p.z, p.cu_seqlens)
    state = p.state.clone()
    out = ops.mamba2_chunk_scan(*p.args(state), p.cu_seqlens, z=p.z)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3 if dtype == torch.float16 else 1e-5
    assert_close_rel(out, out_v, tol, "output vs vLLM")
    assert_close_rel(state[p.state_indices.long()], states, max(tol, 1.5e-2 if dtype == torch.bfloat16 else tol),
                     "states vs vLLM")


@pytest.mark.vllm
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_decode_matches_vllm_cpu_op(dtype):
    """vLLM's selective_state_update (CPU) with MambaMixer2's tied shapes (A [H, P, N], dt [B, H, P],
    D / dt_bias [H, P] as stride-0 views). Slot 0 is vLLM's null block, so indices start at 1."""
    _vllm_ops()
    from vllm.model_executor.layers.mamba.ops.cpu.mamba_ssm import selective_state_update

    p = make_m2([1] * 5, 4, 16, 2, 32, dtype, torch.float32, seed=31, with_z=True)
    H, P, N = 4, 16, 32
    state_v = p.state.clone()
    out_v = selective_state_update(
        state_v, p.x, p.dt[:, :, None].expand(5, H, P), p.A[:, None, None].expand(H, P, N), p.B, p.C,
        p.D[:, None].expand(H, P), p.z, p.dt_bias[:, None].expand(H, P), dt_softplus=True,
        state_batch_indices=p.state_indices, dst_state_batch_indices=p.state_indices,
    )
    state = p.state.clone()
    out = ops.mamba2_state_update(*p.args(state), z=p.z)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3 if dtype == torch.float16 else 1e-5
    assert_close_rel(out, out_v, tol, "output vs vLLM")
    assert_close_rel(state, state_v, 1e-5, "states vs vLLM")


@pytest.mark.parametrize("dt_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_dt_dtype_independent_of_x(dt_dtype):
    """dt may come in another float dtype than x (e.g. fp32 dt beside bf16 activations)."""
    p = make_m2([70, 1, 9], 4, 16, 2, 32, torch.bfloat16, torch.float32, seed=24, with_z=True)
    p.dt = p.dt.to(dt_dtype)
    prefill_and_compare(p)
    q = make_m2([1] * 5, 4, 16, 2, 32, torch.bfloat16, torch.float32, seed=25)
    q.dt = q.dt.to(dt_dtype)
    decode_and_compare(q)
