"""Property-based checks of the ops (hypothesis). Run in a child process by
tests/test_properties.py, so that a crash in any example fails that test instead of killing the suite.

Properties, over random shapes, strides, dtypes, lengths, padding and hostile values:
  * results match the float64 reference;
  * every slot not named in a call is bit-identical afterwards;
  * NaN/Inf in one sequence never changes another sequence's output or state;
  * a sequence's result is bit-identical alone or inside any batch (batch invariance);
  * invalid arguments raise ValueError/TypeError/IndexError, never crash or write state;
  * causal_conv1d: reference match, exact state, slot isolation and NaN containment likewise.
"""

import os
import sys

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gdn_cases import OUT_RTOL, assert_close_rel, bf16_products_in_use, prefill_rtols  # noqa: E402

from vllm_gdn_cpu import ops  # noqa: E402
from vllm_gdn_cpu.reference import (  # noqa: E402
    causal_conv1d_ref,
    chunk_gated_delta_rule_ref,
    fused_recurrent_gated_delta_rule_ref,
)

EXAMPLES = int(os.environ.get("GDN_PROPERTY_EXAMPLES", "100"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def batches(draw, max_len=80):
    """A varlen batch: inputs as (possibly strided) views, a state pool with scattered slots, padding."""
    n = draw(st.integers(1, 5))
    seqlens = draw(st.lists(st.integers(0, max_len), min_size=n, max_size=n))
    Hk = draw(st.integers(1, 2))
    Hv = Hk * draw(st.sampled_from([1, 2, 3]))
    K = draw(st.sampled_from([8, 16, 32, 48]))
    V = draw(st.sampled_from([8, 16, 24, 64]))
    dtype = draw(st.sampled_from(DTYPES))
    state_dtype = draw(st.sampled_from(DTYPES))
    strided = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    T = sum(seqlens)
    width = 2 * Hk * K + Hv * V + (5 if strided else 0)
    mixed = torch.randn(T, width, generator=gen).to(dtype)
    q = mixed[:, : Hk * K].view(T, Hk, K)
    k = mixed[:, Hk * K : 2 * Hk * K].view(T, Hk, K)
    v = mixed[:, 2 * Hk * K : 2 * Hk * K + Hv * V].view(T, Hv, V)
    a = torch.randn(T, Hv, generator=gen) * 3
    b = torch.randn(T, Hv, generator=gen) * 3
    num_slots = n + draw(st.integers(0, 4))
    slots = torch.randperm(num_slots, generator=gen)[:n].to(torch.int32)
    pad = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    slots[torch.tensor(pad)] = -1
    state = (0.5 * torch.randn(num_slots, Hv, K, V, generator=gen)).to(state_dtype)
    cu = torch.zeros(n + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
    has_init = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return dict(q=q, k=k, v=v, a=a, b=b, A_log=torch.randn(Hv, generator=gen), dt_bias=torch.randn(Hv, generator=gen),
                state=state, idx=slots, cu=cu, has_init=has_init, dtype=dtype, state_dtype=state_dtype)


def prefill(x, state, **over):
    g, beta = ops.gdn_gating(x["A_log"], x["a"], x["b"], x["dt_bias"])
    args = dict(q=x["q"], k=x["k"], v=x["v"], g=g, beta=beta, state=state, state_indices=x["idx"],
                cu_seqlens=x["cu"], has_initial_state=x["has_init"])
    args.update(over)
    return ops.chunk_gated_delta_rule(**args)


def decode(x, state):
    return ops.fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["A_log"], x["dt_bias"], x["a"], x["b"],
                                                state, x["idx"], x["cu"])


def untouched_slots(x):
    named = set(x["idx"].tolist())
    return [s for s in range(x["state"].shape[0]) if s not in named]


@SETTINGS
@given(batches())
def test_prefill_matches_reference_and_isolates_slots(x):
    state = x["state"].clone()
    out = prefill(x, state)
    g, beta = ops.gdn_gating(x["A_log"], x["a"], x["b"], x["dt_bias"])
    ref_state = x["state"].double()
    expected = chunk_gated_delta_rule_ref(x["q"], x["k"], x["v"], g, beta, ref_state, x["idx"], x["cu"],
                                          has_initial_state=x["has_init"], compute_dtype=torch.float64)
    out_rtol, state_rtol = prefill_rtols(x["dtype"], x["state_dtype"])
    # With bf16 products, rounding q and k costs ~2^-8 of |q||k| = 1 in each q.k, however small q.k
    # is: judge the outputs against the size they have when q.k ~ 1 (seen on AMX: a T=1 output of
    # max 0.03 off by 5e-4 because q.k cancelled to ~0.03).
    floor = 1e-3
    if bf16_products_in_use(x["dtype"]):
        floor = x["v"].double().abs().amax().item() * x["q"].shape[-1] ** -0.5 if x["v"].numel() else floor
    assert_close_rel(out, expected, out_rtol, "prefill output", floor=floor)
    assert_close_rel(state, ref_state, state_rtol, "prefill state")
    rest = untouched_slots(x)
    assert torch.equal(state[rest], x["state"][rest])


@SETTINGS
@given(batches(max_len=4))
def test_decode_matches_reference_and_isolates_slots(x):
    state = x["state"].clone()
    out = decode(x, state)
    ref_state = x["state"].double()
    expected = fused_recurrent_gated_delta_rule_ref(x["q"], x["k"], x["v"], x["A_log"], x["dt_bias"], x["a"], x["b"],
                                                    ref_state, x["idx"], x["cu"], compute_dtype=torch.float64)
    assert_close_rel(out, expected, OUT_RTOL[x["dtype"]], "decode output")
    assert_close_rel(state, ref_state, max(OUT_RTOL[x["dtype"]], 1e-2 if x["state_dtype"] != torch.float32 else 2e-5),
                     "decode state")
    rest = untouched_slots(x)
    assert torch.equal(state[rest], x["state"][rest])


@SETTINGS
@given(batches(), st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.data())
def test_hostile_values_stay_in_their_sequence(x, bad, data):
    """Poison one sequence's q/k/v/a/b: every other sequence's output and state stay bit-identical."""
    cu = x["cu"].tolist()
    victims = [i for i in range(len(cu) - 1) if cu[i + 1] > cu[i]]
    if not victims:
        return
    victim = data.draw(st.sampled_from(victims))
    t = data.draw(st.integers(cu[victim], cu[victim + 1] - 1))
    which = data.draw(st.sampled_from(["q", "k", "v", "a", "b"]))
    poisoned = dict(x)
    poisoned[which] = x[which].clone()
    poisoned[which][t] = bad
    for run in (prefill, decode):
        s_clean, s_bad = x["state"].clone(), x["state"].clone()
        o_clean, o_bad = run(x, s_clean), run(poisoned, s_bad)
        for i in range(len(cu) - 1):
            if i == victim:
                continue
            assert torch.equal(o_bad[cu[i] : cu[i + 1]], o_clean[cu[i] : cu[i + 1]]), f"{run.__name__}: seq {i} changed"
            slot = int(x["idx"][i])
            if slot >= 0:
                assert torch.equal(s_bad[slot], s_clean[slot]), f"{run.__name__}: state of seq {i} changed"
        rest = untouched_slots(x)
        assert torch.equal(s_bad[rest], x["state"][rest])


@SETTINGS
@given(batches(), st.data())
def test_batch_invariance(x, data):
    """Sequence i gives bit-identical output and state whether run in the batch or alone."""
    cu = x["cu"].tolist()
    i = data.draw(st.integers(0, len(cu) - 2))
    s_batch = x["state"].clone()
    o_batch = prefill(x, s_batch)
    lo, hi = cu[i], cu[i + 1]
    alone = dict(x, q=x["q"][lo:hi], k=x["k"][lo:hi], v=x["v"][lo:hi], a=x["a"][lo:hi], b=x["b"][lo:hi],
                 idx=x["idx"][i : i + 1], cu=torch.tensor([0, hi - lo], dtype=torch.int32),
                 has_init=x["has_init"][i : i + 1])
    s_alone = x["state"].clone()
    o_alone = prefill(alone, s_alone)
    assert torch.equal(o_alone, o_batch[lo:hi])
    slot = int(x["idx"][i])
    if slot >= 0:
        assert torch.equal(s_alone[slot], s_batch[slot])


@SETTINGS
@given(batches(), st.integers(2, 8), st.booleans(), st.data())
def test_conv_matches_reference_isolates_slots_and_contains_nan(x, W, dim_first, data):
    """causal_conv1d on the batch's v channels: reference match, slot isolation, NaN containment."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    xs = x["v"].flatten(1)  # [T, Hv*V], rows strided when the batch is
    D = xs.shape[1]
    weight, bias = torch.randn(D, W, generator=gen), torch.randn(D, generator=gen)
    conv_state = torch.randn(x["state"].shape[0], D, W - 1, generator=gen).to(x["state_dtype"])
    conv_state = conv_state.transpose(1, 2) if dim_first else conv_state.transpose(1, 2).contiguous()
    ref_state = conv_state.double()
    expected = causal_conv1d_ref(xs, weight, bias, ref_state, x["idx"], x["cu"], x["has_init"], True,
                                 compute_dtype=torch.float64)
    state = conv_state.clone()
    out = ops.causal_conv1d(xs, weight, bias, state, x["idx"], x["cu"], has_initial_state=x["has_init"])
    assert_close_rel(out, expected, OUT_RTOL[x["dtype"]], "conv output")
    assert torch.equal(state, ref_state.to(x["state_dtype"])), "conv state must hold the exact past inputs"
    cu = x["cu"].tolist()
    victims = [i for i in range(len(cu) - 1) if cu[i + 1] > cu[i]]
    if victims:  # poison one token of one sequence: every other sequence is unchanged
        victim = data.draw(st.sampled_from(victims))
        poisoned = xs.clone()
        poisoned[data.draw(st.integers(cu[victim], cu[victim + 1] - 1))] = float("nan")
        s_bad = conv_state.clone()
        o_bad = ops.causal_conv1d(poisoned, weight, bias, s_bad, x["idx"], x["cu"], has_initial_state=x["has_init"])
        for i in range(len(cu) - 1):
            if i != victim:
                assert torch.equal(o_bad[cu[i] : cu[i + 1]], out[cu[i] : cu[i + 1]])
                if int(x["idx"][i]) >= 0:
                    assert torch.equal(s_bad[int(x["idx"][i])], state[int(x["idx"][i])])


@pytest.mark.error_path
@SETTINGS
@given(batches(max_len=6), st.data())
def test_invalid_arguments_raise_and_write_nothing(x, data):
    T = x["q"].shape[0]
    n = x["idx"].shape[0]
    num_slots = x["state"].shape[0]
    g, beta = ops.gdn_gating(x["A_log"], x["a"], x["b"], x["dt_bias"])
    corruptions = {
        "slot out of range": dict(state_indices=torch.full((n,), num_slots + data.draw(st.integers(0, 10**6)),
                                                           dtype=torch.int32)),
        "cu beyond T": dict(cu_seqlens=torch.cat([x["cu"][:-1], torch.tensor([T + 1], dtype=torch.int32)])),
        "cu decreasing": dict(cu_seqlens=torch.cat([x["cu"][:1], x["cu"][1:].flip(0) - 1])) if n > 1 and T > 0
        else dict(cu_seqlens=torch.tensor([1] + [0] * n, dtype=torch.int32)),
        "idx int64": dict(state_indices=x["idx"].long()),
        "g shape": dict(g=g[:, :0]),
        "out shape": dict(out=torch.empty(T + 1, *x["v"].shape[1:], dtype=x["dtype"])),
        "state rank": dict(state=x["state"][0]),
    }
    name = data.draw(st.sampled_from(sorted(corruptions)))
    state = x["state"].clone()
    try:
        prefill(x, state, **corruptions[name])
    except (ValueError, TypeError, IndexError):
        pass
    else:
        raise AssertionError(f"{name}: no exception")
    assert torch.equal(state, x["state"]), f"{name}: state written"
