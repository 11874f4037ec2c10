"""Decode with bf16/fp16 state caches on every ISA: against the float64 reference, and the rounding
of the updated state to bf16 bit for bit (each ISA has its own conversion code: AVX2 rounds in
16-bit words, AVX-512 with integer operations or vcvtne2ps2bf16, generic scalar)."""

import pytest
import torch

from gdn_cases import DTYPE_IDS, OUT_RTOL, STATE_RTOL, assert_close_rel, forced_isa, isas, make_problem
from vllm_gdn_cpu import ops
from vllm_gdn_cpu.reference import fused_recurrent_gated_delta_rule_ref

# One token per sequence (the streaming kernel where V allows its tiles): batch 1 (V split across
# threads), batch 16, and V = 96 / 48 (narrower tiles, or the general kernel and scalar columns).
SHAPES = [
    (1, 2, 4, 128, 128),
    (16, 2, 4, 64, 128),
    (5, 1, 2, 32, 96),
    (3, 1, 1, 16, 48),
]


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"b{s[0]}-h{s[1]}/{s[2]}-k{s[3]}v{s[4]}")
def test_decode_narrow_state_all_isas(isa, state_dtype, shape):
    N, Hk, Hv, K, V = shape
    p = make_problem([1] * N, Hk, Hv, K, V, torch.bfloat16, state_dtype, seed=3)
    state_ref = p.state.double()
    expected = fused_recurrent_gated_delta_rule_ref(
        p.q, p.k, p.v, p.A_log, p.dt_bias, p.a, p.b, state_ref, p.state_indices, None, compute_dtype=torch.float64
    )
    state = p.state.clone()
    with forced_isa(isa):
        out = ops.fused_recurrent_gated_delta_rule(p.q, p.k, p.v, p.A_log, p.dt_bias, p.a, p.b, state, p.state_indices)
    assert_close_rel(out, expected, OUT_RTOL[torch.bfloat16], "output")
    assert_close_rel(state, state_ref, STATE_RTOL[state_dtype], "final state")
    untouched = torch.ones(state.shape[0], dtype=torch.bool)
    untouched[p.state_indices.long()] = False
    assert torch.equal(state[untouched], p.state[untouched]), "slots not given were written"


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16).int() & 0xFFFF


@pytest.mark.parametrize("isa", isas())
def test_decode_bf16_state_rounds_to_nearest_even(isa):
    """A step whose fp32 update is exact: from a zero state, with beta 1 and k = e_0 (no l2norm), row 0
    of the new state is exactly v (fp32) and every other row 0 * v. Row 0 in
    bf16 must then be torch's round-to-nearest-even of v, bit for bit: ties to even both ways,
    values either side of a tie, carries into the exponent, overflow to infinity, subnormals, signs.
    NaN must stay NaN (including payloads that a carry would turn into infinity or a sign)."""
    N, Hk, Hv, K, V = 4, 1, 2, 16, 128
    patterns = []
    for hi in (0x3F80, 0x3F81, 0x3F7F, 0x7F7F, 0x0001, 0x0080, 0x4000, 0x42FF, 0xBF80, 0xBF81, 0xFF7F, 0x807F):
        for lo in (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x4000, 0xC000):
            patterns.append((hi << 16) | lo)
    words = torch.tensor(patterns * (N * Hv * V // len(patterns) + 1), dtype=torch.int64)[: N * Hv * V]
    # Shuffle so that every column position sees every kind of value.
    words = words[torch.randperm(words.numel(), generator=torch.Generator().manual_seed(0))]
    v = words.to(torch.int32).view(torch.float32).reshape(N, Hv, V).clone()
    v[0, 0, :4] = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")])
    v[0, 1, 5] = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)  # NaN, all-ones payload
    v[1, 1, 7] = torch.tensor([-1], dtype=torch.int32).view(torch.float32)  # 0xffffffff: NaN
    q = torch.zeros(N, Hk, K)
    k = torch.zeros(N, Hk, K)
    k[:, :, 0] = 1.0
    A_log = torch.zeros(Hv)
    dt_bias = torch.zeros(Hv)
    a = torch.zeros(N, Hv)
    b = torch.full((N, Hv), 100.0)  # sigmoid(100) = 1 in fp32
    state = torch.zeros(2 * N, Hv, K, V, dtype=torch.bfloat16)
    idx = torch.arange(0, 2 * N, 2, dtype=torch.int32)
    with forced_isa(isa):
        ops.fused_recurrent_gated_delta_rule(q, k, v, A_log, dt_bias, a, b, state, idx, use_qk_l2norm=False)
    got = state[idx.long(), :, 0, :]
    want = v.to(torch.bfloat16)
    # Our ops flush denormals (kernels/common/fp_env.h; vcvtneps2bf16 does regardless): subnormal
    # inputs arrive as zeros, of either sign once added to the zero state.
    subnormal = (v != 0) & (v.abs() < torch.finfo(torch.float32).tiny)
    assert subnormal.any()
    assert (got[subnormal] == 0).all(), "a subnormal input was not flushed"
    nan = torch.isnan(v)
    assert torch.isnan(got[nan]).all(), "NaN did not stay NaN"
    mismatch = (_bits(got) != _bits(want)) & ~nan & ~subnormal
    if mismatch.any():
        i = mismatch.nonzero()[0].tolist()
        word = v[tuple(i)].view(torch.int32).item() & 0xFFFFFFFF
        pytest.fail(f"{int(mismatch.sum())} values rounded wrongly, e.g. {word:#010x} -> "
                    f"{_bits(got)[tuple(i)].item():#06x}, want {_bits(want)[tuple(i)].item():#06x}")
    # Rows 1.. are 0 * v: zero, NaN where v is not finite. Slots not given stay zero.
    rest = state[idx.long(), :, 1:, :].float()
    finite = torch.isfinite(v)[:, :, None, :].expand_as(rest)
    assert (rest[finite] == 0).all() and torch.isnan(rest[~finite]).all()
    assert (state[idx.long() + 1] == 0).all()
