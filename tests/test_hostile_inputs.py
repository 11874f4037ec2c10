"""Hostile numbers and hostile tensors, every op that writes a state or an output.

Denormals: our kernels run with flush-to-zero / denormals-are-zero on their own threads for the
duration of the op (kernels/common/fp_env.h), whatever the caller set, and give the caller's setting
back. Hostile tensors: aliased state pools, stride-0 or state-overlapping outputs, meta tensors,
non-tensors and non-finite scalar parameters are refused with an exception naming the argument,
before anything is written.
"""

from __future__ import annotations

import contextlib
import platform

import pytest
import torch

from op_calls import IDX, SENTINEL, SLOTS, STATE_OPS, build, caller_flushes

FLUSHING_TARGET = platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64")


@contextlib.contextmanager
def caller_flush(on: bool):
    before = caller_flushes()
    torch.set_flush_denormal(on)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def _is_denormal(t: torch.Tensor) -> torch.Tensor:
    a = t.abs()
    return (a > 0) & (a < torch.finfo(torch.float32).tiny)


# ----------------------------------------------------------------------------- denormals


@pytest.mark.skipif(not FLUSHING_TARGET, reason="flush-to-zero is set on x86-64 and aarch64 only")
@pytest.mark.parametrize("caller", [False, True], ids=["caller-keeps", "caller-flushes"])
@pytest.mark.parametrize("op", STATE_OPS)
def test_op_flushes_denormals_and_restores_callers_setting(op, caller):
    """States of denormals, decay 1, nothing added: every value the op computes from them is a
    denormal in exact arithmetic (checked in float64); ours are exactly 0 whatever the caller set,
    and the caller's setting is the same afterwards."""
    call = build(op, "neutral")
    exact = {}
    for name in call.written:
        if name == "out":
            continue
        exact[name] = call.kwargs[name][IDX].double()  # decay 1, no update: the state keeps its values
    assert all(_is_denormal(v.float()).all() for v in exact.values()) or op == "causal_conv1d"
    with caller_flush(caller):
        call()
        assert caller_flushes() == caller
    for name in call.written:
        got = call.kwargs[name]
        rows = got[IDX] if name in call.pools else got
        assert not _is_denormal(rows).any(), f"{op}: '{name}' holds denormals"
        if name in call.pools:
            assert torch.equal(rows, torch.zeros_like(rows)), f"{op}: '{name}' not flushed to 0"
            untouched = [s for s in range(SLOTS) if s not in IDX]
            assert torch.equal(got[untouched], torch.full_like(got[untouched], SENTINEL))
    if op == "causal_conv1d":
        # out = silu(sum of the denormal taps): a denormal in exact arithmetic, 0 from us.
        first = call.kwargs["out"][0]
        assert torch.equal(first, torch.zeros_like(first))


@pytest.mark.parametrize("op", STATE_OPS)
def test_strong_decays_same_results_whatever_the_caller_set(op):
    base = build(op, "strong")
    results = {}
    for caller in (False, True):
        call = base.clone()
        with caller_flush(caller):
            call()
            assert caller_flushes() == caller
        results[caller] = [call.kwargs[n] for n in call.written]
    for a, b in zip(results[False], results[True]):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


@pytest.mark.error_path
def test_our_ops_leave_the_callers_setting_alone_after_errors():
    call = build("chunk_gated_delta_rule")
    for caller in (False, True):
        with caller_flush(caller):
            with pytest.raises(ValueError):
                call(scale=float("nan"))
            assert caller_flushes() == caller


# ----------------------------------------------------------------------------- hostile tensors


def _aliased_pools(pool: torch.Tensor):
    """Pools whose slots share memory, each with the same shape as `pool` (a base buffer of sentinels
    behind each, returned beside it)."""
    slot = pool[0].numel()
    inner = pool.stride()[1:]
    yield "expand", (lambda b: b.expand(pool.shape)), torch.full((1, *pool.shape[1:]), SENTINEL)
    yield "half-slot stride", (lambda b: b.as_strided(pool.shape, (slot // 2, *inner))), \
        torch.full((slot * SLOTS,), SENTINEL)
    yield "slot stride 1", (lambda b: b.as_strided(pool.shape, (1, *inner))), torch.full((slot + SLOTS,), SENTINEL)


ALIAS_CASES = [(op, pool) for op in STATE_OPS for pool in build(op).pools]


@pytest.mark.error_path
@pytest.mark.parametrize("op,pool", ALIAS_CASES, ids=[f"{o}-{p}" for o, p in ALIAS_CASES])
def test_aliased_state_pool_refused(op, pool):
    call = build(op)
    for label, make, base in _aliased_pools(call.kwargs[pool]):
        before = base.clone()
        out_before = call.kwargs["out"].clone()
        with pytest.raises(ValueError, match=f"argument '{pool}' has elements that share memory"):
            call(**{pool: make(base)})
        assert torch.equal(base, before), label
        assert torch.equal(call.kwargs["out"], out_before) or torch.isnan(out_before).any(), label


@pytest.mark.error_path
@pytest.mark.parametrize("op", STATE_OPS)
def test_stride0_and_overlapping_out_refused(op):
    call = build(op)
    out = call.kwargs["out"]
    states = {n: call.kwargs[n].clone() for n in call.pools}
    with pytest.raises(ValueError, match="argument 'out' has elements that share memory"):
        call(out=torch.zeros(1, *out.shape[1:]).expand(out.shape))
    # out inside a state pool's memory: the op would write slots it was not given.
    pool = call.pools[-1]
    if call.kwargs[pool].numel() >= out.numel():
        inside = call.kwargs[pool].view(-1)[: out.numel()].view(out.shape)
        with pytest.raises(ValueError, match=f"arguments 'out' and '{pool}' share memory"):
            call(out=inside)
    for n, s in states.items():
        assert torch.equal(call.kwargs[n], s)


@pytest.mark.error_path
@pytest.mark.parametrize("op", STATE_OPS)
def test_meta_tensors_refused(op):
    call = build(op)
    states = {n: call.kwargs[n].clone() for n in call.pools}
    out_before = call.kwargs["out"].clone()
    tensors = [n for n, v in call.kwargs.items() if isinstance(v, torch.Tensor)]
    for name in tensors:
        with pytest.raises(ValueError, match=f"argument '{name}' must be a CPU tensor, got one on meta"):
            call(**{name: call.kwargs[name].to("meta")})
    # Everything on meta (the wrapper allocates nothing on the CPU then).
    with pytest.raises(ValueError, match="must be a CPU tensor, got one on meta"):
        call(**{n: call.kwargs[n].to("meta") for n in tensors})
    for n, s in states.items():
        assert torch.equal(call.kwargs[n], s)
    assert torch.equal(call.kwargs["out"], out_before) or torch.isnan(out_before).any()


@pytest.mark.error_path
@pytest.mark.parametrize("op", STATE_OPS)
def test_non_tensor_arguments_named(op):
    call = build(op)
    required = [n for n, v in call.kwargs.items() if isinstance(v, torch.Tensor) and n != "out"]
    for name in required:
        for bad in (None, 3, [1.0, 2.0]):
            with pytest.raises(TypeError, match=f"{call.fn.__name__}: argument '{name}' must be a torch.Tensor"):
                call(**{name: bad})
    with pytest.raises(TypeError, match="argument 'out' must be a torch.Tensor or None"):
        call(out=[0.0])


SCALAR_CASES = [(op, arg, bad) for op in STATE_OPS for arg, bads in build(op).scalars.items() for bad in bads]


@pytest.mark.error_path
@pytest.mark.parametrize("op,arg,bad", SCALAR_CASES, ids=[f"{o}-{a}-{b}" for o, a, b in SCALAR_CASES])
def test_non_finite_scalars_refused(op, arg, bad):
    call = build(op)
    states = {n: call.kwargs[n].clone() for n in call.pools}
    name = "dt_limit" if arg == "dt_limit" else arg
    with pytest.raises(ValueError, match=f"argument '{name}(\\[0\\])?' must"):
        call(**{arg: bad})
    for n, s in states.items():
        assert torch.equal(call.kwargs[n], s)


PARAM_CASES = [  # (op, argument, name in the message); g / beta of the chunk ops are per-token data
    ("fused_recurrent_gated_delta_rule", "A_log", "A_log"),
    ("fused_recurrent_gated_delta_rule", "dt_bias", "dt_bias"),
    ("gdn_decode_step", "A_log", "A_log"),
    ("mamba2_chunk_scan", "A", "A"),
    ("mamba2_state_update", "A", "A"),
    ("fused_recurrent_kda", "A_log", "A_log"),
]


@pytest.mark.error_path
@pytest.mark.parametrize("op,arg,name", PARAM_CASES, ids=[f"{c[0]}-{c[1]}" for c in PARAM_CASES])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_per_head_parameters_refused(op, arg, name, bad):
    call = build(op)
    value = call.kwargs[arg].clone()
    value[-1] = bad
    states = {n: call.kwargs[n].clone() for n in call.pools}
    with pytest.raises(ValueError, match=f"argument '{name}' must (be finite|be <= 0)"):
        call(**{arg: value})
    for n, s in states.items():
        assert torch.equal(call.kwargs[n], s)


@pytest.mark.error_path
def test_gating_ops_refuse_non_finite_parameters():
    from vllm_gdn_cpu import ops

    A_log, a, b, dt_bias = torch.zeros(3), torch.randn(4, 3), torch.randn(4, 3), torch.zeros(3)
    for name, over in [("A_log", dict(A_log=torch.tensor([0.0, float("inf"), 0.0]))),
                       ("dt_bias", dict(dt_bias=torch.tensor([float("nan"), 0.0, 0.0]))),
                       ("softplus_beta", dict(softplus_beta=float("nan")))]:
        args = dict(A_log=A_log, a=a, b=b, dt_bias=dt_bias)
        args.update(over)
        with pytest.raises(ValueError, match=f"gdn_gating: argument '{name}' must be finite"):
            ops.gdn_gating(**args)
    f, bb = torch.randn(4, 3, 8), torch.randn(4, 3)
    with pytest.raises(ValueError, match="kda_gate: argument 'A_log' must be finite"):
        ops.kda_gate(torch.tensor([0.0, float("nan"), 0.0]), f, bb, torch.zeros(24))
    with pytest.raises(ValueError, match="kda_gate: argument 'lower_bound' must be finite"):
        ops.kda_gate(torch.zeros(3), f, bb, torch.zeros(24), lower_bound=float("nan"))
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="gated_rms_norm: argument 'eps' must be finite"):
        ops.gated_rms_norm(x, x, torch.ones(8), float("inf"))


@pytest.mark.error_path
@pytest.mark.parametrize("op", ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "chunk_kda",
                                "fused_recurrent_kda"])
def test_empty_head_dim_with_default_scale_named(op):
    call = build(op)
    empty = {n: call.kwargs[n][..., :0] for n in ("q", "k")}
    with pytest.raises(ValueError, match="argument 'q'/'v' must have non-empty heads"):
        call(**empty)


def test_nan_in_mamba1_decay_propagates():
    """A NaN decay rate is not a decay of 0: the channel's outputs are NaN, the others unaffected."""
    for op in ("selective_scan", "selective_state_update"):
        call = build(op)
        A = call.kwargs["A"].clone()
        A[3, 5] = float("nan")
        call(A=A)
        out = call.kwargs["out"]
        assert torch.isnan(out[:, 3]).all(), op
        assert torch.isfinite(torch.cat([out[:, :3], out[:, 4:]], 1)).all(), op


def test_nan_in_kda_dt_bias_propagates():
    call = build("fused_recurrent_kda")
    dt_bias = call.kwargs["dt_bias"].clone()
    dt_bias[0] = float("nan")  # head 0, channel 0
    call(dt_bias=dt_bias)
    out = call.kwargs["out"]
    assert torch.isnan(out[:, 0]).all()
    assert torch.isfinite(out[:, 1]).all()
