"""fused_recurrent_gated_delta_rule (decode, gating fused) against the float64 reference."""

import os
from contextlib import contextmanager

import pytest
import torch

from gdn_cases import (DTYPE_IDS, DTYPES, OUT_RTOL, STATE_RTOL, assert_close_rel, forced_isa, isas,
                       make_problem, torch_threads)
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


# ----------------------------------------------------------------------------- work split
# VLLM_GDN_CPU_DECODE_SPLIT picks how the decode splits each (sequence, head) state into column
# blocks, VLLM_GDN_CPU_DECODE_CLAIM how the threads take them (kernels/common/decode_split.h).
# Columns are independent and each is computed with the same operations in the same order whatever
# block holds it and whichever thread takes it, so every schedule must give the same outputs and
# states bit for bit. vblocks:16 / vblocks:32 / vblocks run the one-, two- and four-vector tiles
# (AVX-512; AVX2 and generic: wider in vectors), heads the widest; vblocks:48 blocks of unequal width.
SPLIT_ENV = "VLLM_GDN_CPU_DECODE_SPLIT"
CLAIM_ENV = "VLLM_GDN_CPU_DECODE_CLAIM"
SPLITS = ["auto", "vblocks", "vblocks:16", "vblocks:32", "vblocks:48"]
CLAIMS = ["static", "dynamic", "auto"]


@contextmanager
def forced_env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def forced_split(value: str):
    return forced_env(SPLIT_ENV, value)


def decode_with_split(p, split, cu_seqlens=None, claim="auto"):
    state = p.state.clone()
    with forced_split(split), forced_env(CLAIM_ENV, claim):
        out = ops.fused_recurrent_gated_delta_rule(
            p.q, p.k, p.v, p.A_log, p.dt_bias, p.a, p.b, state, p.state_indices, cu_seqlens)
    return out, state


# (seqlens, Hk, Hv, K, V): batch 1 GQA, batch 2 with K != V, batch 3 with a padded entry, and
# speculative-decoding-like sequences of several tokens (the general path).
SPLIT_CASES = [
    ([1], 2, 4, 64, 128),
    ([1, 1], 1, 2, 96, 192),
    ([1, 1, 1], 2, 2, 32, 64),
    ([3, 1, 2], 1, 2, 32, 96),
]


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: f"n{len(c[0])}t{sum(c[0])}-h{c[1]}/{c[2]}-k{c[3]}v{c[4]}")
def test_decode_splits_agree_bitwise(isa, state_dtype, case):
    seqlens, Hk, Hv, K, V = case
    p = make_problem(seqlens, Hk, Hv, K, V, torch.bfloat16, state_dtype, seed=7)
    if len(seqlens) == 3:
        p.state_indices[1] = -1  # padding: zero output, slot untouched
    cu = None if all(n == 1 for n in seqlens) else p.cu_seqlens
    touched = [s for s in p.state_indices.tolist() if s >= 0]
    untouched = [s for s in range(p.state.shape[0]) if s not in touched]
    with forced_isa(isa), torch_threads(3):
        want_out, want_state = decode_with_split(p, "heads", cu, claim="static")
        for split in SPLITS + ["heads"]:
            for claim in CLAIMS:
                out, state = decode_with_split(p, split, cu, claim)
                assert torch.equal(out, want_out), f"{split}/{claim}: output differs from heads/static"
                assert torch.equal(state, want_state), f"{split}/{claim}: state differs from heads/static"
    assert torch.equal(want_state[untouched], p.state[untouched])
    assert not torch.equal(want_state[touched], p.state[touched])
    if len(seqlens) == 3:  # the padded sequence's tokens
        assert (want_out[p.cu_seqlens[1]:p.cu_seqlens[2]] == 0).all()
    # heads itself against the float64 reference.
    ref_state = p.state.double()
    ref_out = fused_recurrent_gated_delta_rule_ref(p.q, p.k, p.v, p.A_log, p.dt_bias, p.a, p.b, ref_state,
                                                   p.state_indices, cu, compute_dtype=torch.float64)
    assert_close_rel(want_out, ref_out, OUT_RTOL[torch.bfloat16], "output")
    assert_close_rel(want_state, ref_state, STATE_RTOL[state_dtype], "final state")


@pytest.mark.parametrize("threads", [1, 2, 5, 16])
def test_decode_splits_agree_at_thread_counts(threads):
    """auto's choices depend on the thread count (more threads than tasks included) and on the state
    size: with two 640 KiB heads auto splits them into V-blocks on 5 and 16 threads."""
    p = make_problem([1], 1, 2, 320, 512, torch.float32, torch.float32, seed=8)
    with torch_threads(threads):
        want = decode_with_split(p, "heads", claim="static")
        for claim in CLAIMS:
            got = decode_with_split(p, "auto", claim=claim)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), claim


@pytest.mark.error_path
@pytest.mark.parametrize("name, value", [(SPLIT_ENV, v) for v in ["rows", "vblocks:0", "vblocks:x", "vblocks:-16",
                                                                  "heads "]] + [(CLAIM_ENV, "guided")])
def test_decode_split_rejects_bad_value(name, value):
    p = make_problem([1], 1, 1, 16, 16, torch.float32, torch.float32)
    state = p.state.clone()
    with forced_env(name, value), pytest.raises(ValueError, match=name):
        ops.fused_recurrent_gated_delta_rule(p.q, p.k, p.v, p.A_log, p.dt_bias, p.a, p.b, state, p.state_indices)
    assert torch.equal(state, p.state)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16, "strided"], ids=str)
def test_decode_per_head_params_of_any_layout(param_dtype):
    """A_log / dt_bias in bf16/fp16 (vLLM keeps them in the model dtype) or strided are read as the
    same fp32 values as their contiguous fp32 conversion."""
    p = make_problem([1] * 3, 2, 4, 32, 64, torch.bfloat16, torch.float32, seed=9)
    if param_dtype == "strided":
        A_log, dt_bias = torch.stack([p.A_log, -p.A_log], 1)[:, 0], torch.stack([p.dt_bias, p.dt_bias], 1)[:, 1]
    else:
        A_log, dt_bias = p.A_log.to(param_dtype), p.dt_bias.to(param_dtype)
    s1, s2 = p.state.clone(), p.state.clone()
    o1 = ops.fused_recurrent_gated_delta_rule(p.q, p.k, p.v, A_log, dt_bias, p.a, p.b, s1, p.state_indices)
    o2 = ops.fused_recurrent_gated_delta_rule(p.q, p.k, p.v, A_log.float().contiguous(),
                                              dt_bias.float().contiguous(), p.a, p.b, s2, p.state_indices)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
