"""fused_recurrent_gated_delta_rule (decode, gating fused) against the float64 reference."""

import pytest
import torch

from gdn_cases import (DTYPE_IDS, DTYPES, OUT_RTOL, STATE_RTOL, assert_close_rel, forced_isa, isas,
                       make_problem)
from vllm_gdn_cpu import ops
from vllm_gdn_cpu.reference import fused_recurrent_gated_delta_rule_ref


def run_and_compare(p, dtype, state_dtype, cu_seqlens=None, **kw):
    state_ref = p.state.double()
    expected = fused_recurrent_gated_delta_rule_ref(
        p.q, p.k, p.v, p.A_log, p.dt_bias, p.a, p.b, state_ref, p.state_indices, cu_seqlens,
        compute_dtype=torch.float64, **kw,
    )
    state = p.state.clone()
    out = ops.fused_recurrent_gated_delta_rule(
        p.q, p.k, p.v, p.A_log, p.dt_bias, p.a, p.b, state, p.state_indices, cu_seqlens, **kw
    )
    assert out.dtype == dtype
    assert_close_rel(out, expected, OUT_RTOL[dtype], "output")
    assert_close_rel(state, state_ref, STATE_RTOL[state_dtype], "final state")
    return state, out


# One token per sequence: batch 1 (V split across threads), 16 and 33; GQA 1/2; K != V.
DECODE_SHAPES = [
    (1, 2, 4, 128, 128),
    (16, 2, 4, 64, 128),
    (33, 1, 1, 96, 192),
    (5, 2, 2, 32, 32),
]


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: f"b{s[0]}-h{s[1]}/{s[2]}-k{s[3]}v{s[4]}")
def test_decode_fp32_all_isas(isa, shape):
    N, Hk, Hv, K, V = shape
    p = make_problem([1] * N, Hk, Hv, K, V, torch.float32, torch.float32, strided=True)
    with forced_isa(isa):
        run_and_compare(p, torch.float32, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("state_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_decode_dtypes(dtype, state_dtype):
    p = make_problem([1] * 7, 2, 4, 64, 128, dtype, state_dtype, seed=1)
    run_and_compare(p, dtype, state_dtype)


@pytest.mark.parametrize("isa", isas())
def test_decode_multi_token_sequences(isa):
    """With cu_seqlens, each sequence runs several tokens (as speculative decoding does)."""
    p = make_problem([3, 1, 4, 2], 2, 4, 64, 64, torch.float32, torch.float32, seed=2)
    with forced_isa(isa):
        run_and_compare(p, torch.float32, torch.float32, cu_seqlens=p.cu_seqlens)


@pytest.mark.parametrize("isa", isas())
def test_decode_padding_and_untouched_slots(isa):
    p = make_problem([1] * 6, 2, 4, 64, 64, torch.float32, torch.float32, seed=3)
    p.state_indices[0] = -1
    p.state_indices[4] = -1
    untouched = [s for s in range(p.state.shape[0]) if s not in p.state_indices.tolist()]
    with forced_isa(isa):
        state, out = run_and_compare(p, torch.float32, torch.float32)
    assert (out[0] == 0).all() and (out[4] == 0).all()
    assert torch.equal(state[untouched], p.state[untouched])


@pytest.mark.parametrize("allow_neg_eigval", [False, True])
def test_decode_gating_options(allow_neg_eigval):
    p = make_problem([1] * 4, 1, 2, 64, 64, torch.float32, torch.float32, seed=4)
    run_and_compare(
        p, torch.float32, torch.float32, allow_neg_eigval=allow_neg_eigval, softplus_beta=2.0,
        softplus_threshold=1.5, scale=0.2,
    )


def test_decode_matches_prefill_on_same_tokens():
    """Decoding a sequence token by token ends in the same state as prefilling it in one call."""
    p = make_problem([97], 2, 4, 64, 64, torch.float32, torch.float32, seed=5)
    g, beta = p.gates()
    s_prefill = p.state.clone()
    o_prefill = ops.chunk_gated_delta_rule(p.q, p.k, p.v, g, beta, s_prefill, p.state_indices, p.cu_seqlens)
    s_decode = p.state.clone()
    outs = []
    for t in range(97):
        sl = slice(t, t + 1)
        outs.append(ops.fused_recurrent_gated_delta_rule(
            p.q[sl], p.k[sl], p.v[sl], p.A_log, p.dt_bias, p.a[sl], p.b[sl], s_decode, p.state_indices))
    assert_close_rel(torch.cat(outs), o_prefill, 2e-5, "decode vs prefill output")
    assert_close_rel(s_decode, s_prefill, 2e-5, "decode vs prefill state")


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_narrow_state_drift_over_256_decode_steps(state_dtype):
    """A bf16/fp16 state is rounded once per step; over 256 steps the outputs drift from an fp32
    state's by the accumulated rounding, which the decay keeps bounded (it does not grow with the
    number of steps). Reported, and bounded at 3% of the output scale for bf16 (8-bit mantissa)."""
    Hk, Hv, K, V = 2, 4, 64, 64
    gen = torch.Generator().manual_seed(11)
    p = make_problem([1], Hk, Hv, K, V, torch.float32, torch.float32, seed=11)  # fp32 activations: only the state rounds
    s32, snarrow = p.state.clone(), p.state.to(state_dtype)
    worst, last = 0.0, 0.0
    for step in range(256):
        q, k, v = torch.randn(1, Hk, K, generator=gen), torch.randn(1, Hk, K, generator=gen), torch.randn(1, Hv, V, generator=gen)
        a, b = torch.randn(1, Hv, generator=gen), torch.randn(1, Hv, generator=gen)
        o32 = ops.fused_recurrent_gated_delta_rule(q, k, v, p.A_log, p.dt_bias, a, b, s32, p.state_indices)
        on = ops.fused_recurrent_gated_delta_rule(q, k, v, p.A_log, p.dt_bias, a, b, snarrow, p.state_indices)
        last = ((on.float() - o32.float()).abs().max() / o32.float().abs().max()).item()
        worst = max(worst, last)
    print(f"{state_dtype} state vs fp32 over 256 steps: worst relative output drift {worst:.3e}, last {last:.3e}")
    assert worst < (3e-2 if state_dtype == torch.bfloat16 else 5e-3)
