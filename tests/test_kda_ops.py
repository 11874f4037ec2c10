"""KDA (Kimi Delta Attention) ops: kda_gate, chunk_kda (prefill), fused_recurrent_kda (decode)
against the float64 token-by-token references, HF transformers' own torch KDA functions, every ISA
and GEMM path; argument errors and opcheck."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import pytest
import torch

from gdn_cases import (DTYPE_IDS, OUT_RTOL, STATE_RTOL, assert_close_rel, forced_gemm, forced_isa, gemms, isas,
                       prefill_rtols)
from vllm_gdn_cpu import ops
from vllm_gdn_cpu.reference import chunk_kda_ref, fused_recurrent_kda_ref, kda_gate_ref


@dataclass
class KdaProblem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    f: torch.Tensor
    b: torch.Tensor
    A_log: torch.Tensor
    dt_bias: torch.Tensor
    state: torch.Tensor
    state_indices: torch.Tensor
    cu_seqlens: torch.Tensor

    def gates(self, **kw):
        return ops.kda_gate(self.A_log, self.f, self.b, self.dt_bias, **kw)


def make_kda(seqlens, H, K, V, dtype=torch.float32, state_dtype=torch.float32, *, seed=0, strided=False,
             decay=1.0) -> KdaProblem:
    """Random inputs, sequence i in slot 2*i+1 of a larger pool; per-head and per-channel spread gates
    (decay scales how strong the decays are: A_log += log(decay))."""
    gen = torch.Generator().manual_seed(seed)
    T, N = sum(seqlens), len(seqlens)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    if strided:  # views into one [T, 3*H*K-ish + pad] buffer, as a split of a fused projection
        width = 2 * H * K + H * V + 5
        mixed = randn(T, width).to(dtype)
        q = mixed[:, : H * K].view(T, H, K)
        k = mixed[:, H * K: 2 * H * K].view(T, H, K)
        v = mixed[:, 2 * H * K: 2 * H * K + H * V].view(T, H, V)
    else:
        q, k, v = randn(T, H, K).to(dtype), randn(T, H, K).to(dtype), randn(T, H, V).to(dtype)
    f = (randn(T, H, K) - 1.0).to(dtype)
    b = (randn(T, H) + 0.5).to(dtype)
    A_log = torch.linspace(-1.0, 0.5, H) + torch.log(torch.tensor(float(decay)))
    dt_bias = torch.linspace(-2.0, 1.0, H * K)
    state = (0.3 * randn(2 * N + 3, H, K, V)).to(state_dtype)
    cu = torch.zeros(N + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
    return KdaProblem(q, k, v, f, b, A_log, dt_bias, state, (2 * torch.arange(N) + 1).to(torch.int32), cu)


def run_chunk(p, g, beta, dtype, state_dtype, has_initial_state=None, **kw):
    state_ref = p.state.double()
    expected = chunk_kda_ref(p.q, p.k, p.v, g, beta, state_ref, p.state_indices, p.cu_seqlens,
                             has_initial_state=has_initial_state, compute_dtype=torch.float64, **kw)
    state = p.state.clone()
    out = ops.chunk_kda(p.q, p.k, p.v, g, beta, state, p.state_indices, p.cu_seqlens,
                        has_initial_state=has_initial_state, **kw)
    assert out.dtype == dtype and out.shape == p.v.shape
    out_rtol, state_rtol = prefill_rtols(dtype, state_dtype)
    assert_close_rel(out, expected, out_rtol, "output")
    assert_close_rel(state, state_ref, state_rtol, "final state")
    return state, out


# ------------------------------------------------------------------------------------------ gate
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("lower_bound", [None, -5.0])
@pytest.mark.parametrize("K", [20, 128])
def test_gate(dtype, lower_bound, K):
    p = make_kda([7, 4], 3, K, 16, dtype)
    f = p.f.clone()
    f[0, 0, :4] = torch.tensor([30.0, 19.5, -30.0, 0.0]).to(dtype)  # softplus linear region, deep tail
    g, beta = ops.kda_gate(p.A_log, f, p.b, p.dt_bias, lower_bound=lower_bound)
    g_ref, beta_ref = kda_gate_ref(p.A_log, f, p.b, p.dt_bias, lower_bound=lower_bound, compute_dtype=torch.float64)
    assert g.dtype == torch.float32 and g.shape == f.shape and beta.shape == p.b.shape
    assert torch.allclose(g.double(), g_ref, rtol=2e-6, atol=1e-6)
    assert torch.allclose(beta.double(), beta_ref, rtol=1e-6, atol=1e-7)
    if lower_bound is not None:
        assert (g >= lower_bound).all() and (g <= 0).all()


# --------------------------------------------------------------------------------------- prefill
# (seqlens, H, K, V): chunk boundaries 63/64/65/129, K != V, odd head dims, varlen with 1-token
# sequences.
SHAPES = [
    ([63], 1, 32, 48),
    ([64], 2, 32, 48),
    ([65], 3, 48, 32),
    ([129], 2, 20, 36),
    ([1, 64, 5, 70], 4, 32, 48),
    ([130], 1, 128, 128),
]
SHAPE_IDS = lambda s: "x".join(map(str, s[0])) + f"-h{s[1]}-k{s[2]}v{s[3]}"  # noqa: E731


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_chunk_fp32(shape):
    seqlens, H, K, V = shape
    p = make_kda(seqlens, H, K, V, strided=True)
    run_chunk(p, *p.gates(), torch.float32, torch.float32)


@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                               (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)],
                         ids=lambda d: DTYPE_IDS[d])
def test_chunk_dtypes(dtype, state_dtype):
    p = make_kda([1, 64, 70], 2, 32, 48, dtype, state_dtype)
    run_chunk(p, *p.gates(), dtype, state_dtype)


@pytest.mark.parametrize("isa", isas())
def test_chunk_all_isas(isa):
    p = make_kda([65, 3], 2, 20, 36, strided=True)
    with forced_isa(isa):
        run_chunk(p, *p.gates(), torch.float32, torch.float32)
        q = make_kda([70], 1, 32, 48, torch.bfloat16, torch.bfloat16, seed=1)
        run_chunk(q, *q.gates(), torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize("gemm", gemms())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_chunk_all_gemms(gemm, dtype):
    p = make_kda([130, 7], 2, 32, 48, dtype)
    with forced_gemm(gemm):
        run_chunk(p, *p.gates(), dtype, torch.float32)


def test_chunk_varlen_pad_and_initial_state():
    """PAD entries touch no slot (every other slot bit-identical), give zero output; sequences
    without an initial state start from zero whatever their slot holds."""
    p = make_kda([5, 64, 1, 70], 2, 32, 48)
    p.state_indices = torch.tensor([1, -1, 3, 7], dtype=torch.int32)
    has_init = torch.tensor([True, True, False, True])
    before = p.state.clone()
    state, out = run_chunk(p, *p.gates(), torch.float32, torch.float32, has_initial_state=has_init)
    used = {1, 3, 7}
    for slot in range(p.state.shape[0]):
        if slot not in used:
            assert torch.equal(state[slot], before[slot]), f"slot {slot} was touched"
    assert (out[5:69] == 0).all()


@pytest.mark.parametrize("regime", ["per_step_50", "ramp", "zero", "mixed"])
def test_chunk_extreme_decays(regime):
    """Cumulative decays of hundreds of nats inside one chunk (exp of them would overflow fp32 if a
    chunk were factored as e^G x e^-G), g = 0 exactly, and channels of both kinds side by side."""
    p = make_kda([64, 130], 2, 32, 48)
    T, H, K = p.q.shape
    gen = torch.Generator().manual_seed(5)
    if regime == "per_step_50":
        g = -50.0 * torch.rand(T, H, K, generator=gen)      # ~-25 nats/step: ~1600 over a chunk
    elif regime == "ramp":
        g = -torch.linspace(0.0, 12.0, T)[:, None, None].expand(T, H, K).contiguous()  # up to ~770 per chunk
    elif regime == "zero":
        g = torch.zeros(T, H, K)
    else:
        g = torch.zeros(T, H, K)
        g[:, :, ::2] = -50.0 * torch.rand(T, H, K // 2, generator=gen)
        g[:, 1, 1::4] = -0.01
    beta = torch.rand(T, H, generator=gen)
    state, out = run_chunk(p, g, beta, torch.float32, torch.float32)
    assert torch.isfinite(out).all() and torch.isfinite(state).all()


def test_chunk_gate_from_op_strong_decays():
    """Decays from the gate op with a large A (exp(A_log) up to ~80): per-step g down to ~-60."""
    p = make_kda([129], 2, 32, 48, decay=50.0)
    g, beta = p.gates()
    assert g.min() < -40
    run_chunk(p, g, beta, torch.float32, torch.float32)


def test_chunk_empty_and_zero_length_sequences():
    """No sequences at all; a zero-length sequence between others (without an initial state its
    slot becomes zero, as in the reference); rows past cu_seqlens[-1] zeroed; a strided out."""
    p = make_kda([4, 0, 4, 2], 2, 16, 24)
    p.cu_seqlens[-1] = 8  # the last "sequence" is empty too; tokens 8, 9 belong to none
    out = torch.full((10, 2, 48), 7.0)[:, :, :24]
    has_init = torch.tensor([True, False, True, True])
    state, _ = run_chunk(p, *p.gates(), torch.float32, torch.float32, has_initial_state=has_init)
    ops.chunk_kda(p.q, p.k, p.v, *p.gates(), p.state.clone(), p.state_indices, p.cu_seqlens,
                  has_initial_state=has_init, out=out)
    assert (out[8:] == 0).all() and (state[3] == 0).all()
    empty = make_kda([], 2, 16, 24)
    o = ops.chunk_kda(empty.q, empty.k, empty.v, *empty.gates(), empty.state, empty.state_indices, empty.cu_seqlens)
    assert o.shape == (0, 2, 24)


# ---------------------------------------------------------------------------------------- decode
def run_decode(p, dtype, state_dtype, cu_seqlens=None, **kw):
    state_ref = p.state.double()
    expected = fused_recurrent_kda_ref(p.q, p.k, p.v, p.A_log, p.dt_bias, p.f, p.b, state_ref, p.state_indices,
                                       cu_seqlens, compute_dtype=torch.float64, **kw)
    state = p.state.clone()
    out = ops.fused_recurrent_kda(p.q, p.k, p.v, p.A_log, p.dt_bias, p.f, p.b, state, p.state_indices, cu_seqlens,
                                  **kw)
    assert_close_rel(out, expected, OUT_RTOL[dtype], "output")
    assert_close_rel(state, state_ref, STATE_RTOL[state_dtype], "final state")
    return state, out


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
                         ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", [(3, 2, 32, 48), (1, 1, 128, 128), (2, 3, 20, 37), (5, 4, 64, 160)],
                         ids=lambda s: "n{}-h{}-k{}v{}".format(*s))
def test_decode(isa, dtype, state_dtype, shape):
    N, H, K, V = shape
    p = make_kda([1] * N, H, K, V, dtype, state_dtype, strided=True)
    with forced_isa(isa):
        run_decode(p, dtype, state_dtype)


def test_decode_empty_batch():
    p = make_kda([], 2, 16, 24)
    before = p.state.clone()
    o = ops.fused_recurrent_kda(p.q, p.k, p.v, p.A_log, p.dt_bias, p.f, p.b, p.state, p.state_indices)
    assert o.shape == (0, 2, 24) and torch.equal(p.state, before)


@pytest.mark.parametrize("lower_bound", [None, -5.0])
def test_decode_multi_token_pad_lower_bound(lower_bound):
    """Several tokens per sequence (cu_seqlens), a PAD entry, the lower-bound gate, strong decays."""
    p = make_kda([3, 1, 4], 2, 32, 48, torch.bfloat16, torch.bfloat16, decay=30.0)
    p.state_indices = torch.tensor([1, -1, 5], dtype=torch.int32)
    before = p.state.clone()
    state, out = run_decode(p, torch.bfloat16, torch.bfloat16, p.cu_seqlens, lower_bound=lower_bound)
    for slot in range(p.state.shape[0]):
        if slot not in (1, 5):
            assert torch.equal(state[slot], before[slot])
    assert (out[3] == 0).all()


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_prefill_then_decode_equals_long_prefill(state_dtype):
    """Prefill of 70 tokens, then 3 decode steps == one prefill of 73 tokens (and its state)."""
    p = make_kda([73], 2, 32, 48, torch.float32, state_dtype)
    g, beta = p.gates()
    long_state = p.state.clone()
    long_out = ops.chunk_kda(p.q, p.k, p.v, g, beta, long_state, p.state_indices, p.cu_seqlens)
    state = p.state.clone()
    cu = torch.tensor([0, 70], dtype=torch.int32)
    outs = [ops.chunk_kda(p.q[:70], p.k[:70], p.v[:70], g[:70], beta[:70], state, p.state_indices, cu)]
    for t in range(70, 73):
        sl = slice(t, t + 1)
        outs.append(ops.fused_recurrent_kda(p.q[sl], p.k[sl], p.v[sl], p.A_log, p.dt_bias, p.f[sl], p.b[sl], state,
                                            p.state_indices))
    rtol = 5e-5 if state_dtype == torch.float32 else 1e-2  # bf16 state: rounded after 70 tokens vs at the end
    assert_close_rel(torch.cat(outs), long_out, rtol, "output")
    assert_close_rel(state, long_state, STATE_RTOL[state_dtype] * (1 if state_dtype == torch.float32 else 2), "state")


# ---------------------------------------------------------------------------- HF transformers
def _hf_kda():
    mod = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear",
                              reason="transformers without models/kimi_linear (added in 5.17)")
    return inspect.unwrap(mod.chunk_kimi_delta_attention), inspect.unwrap(mod.recurrent_kimi_delta_attention)


@pytest.mark.parametrize("seqlen", [63, 130])
def test_vs_hf_transformers(seqlen):
    """Our prefill and decode against HF's own torch KDA (prefill with an initial state, then 2
    decode steps), fp32, gate from HF's own formula (KimiLinearForgetGate)."""
    hf_chunk, hf_recurrent = _hf_kda()
    H, K, V = 2, 32, 32  # HF's KDA has K == V (one head_dim)
    p = make_kda([seqlen + 2], H, K, V, decay=3.0)
    g_hf = (p.f.float() + p.dt_bias.view(1, -1).view(1, H, K))
    g_hf = -p.A_log.exp().view(1, H, 1) * torch.where(g_hf > 20.0, g_hf, torch.log(1.0 + torch.exp(g_hf)))
    g, beta = p.gates()
    assert_close_rel(g, g_hf, 1e-5, "gate vs HF")
    slot = int(p.state_indices[0])
    init = p.state[slot:slot + 1].clone()
    L = seqlen
    o_hf, s_hf = hf_chunk(p.q[None, :L], p.k[None, :L], p.v[None, :L], g[None, :L], beta[None, :L],
                          initial_state=init, output_final_state=True, use_qk_l2norm_in_kernel=True)
    state = p.state.clone()
    cu = torch.tensor([0, L], dtype=torch.int32)
    o = ops.chunk_kda(p.q[:L], p.k[:L], p.v[:L], g[:L], beta[:L], state, p.state_indices, cu)
    assert_close_rel(o, o_hf[0], 1e-4, "prefill output vs HF chunk_kimi_delta_attention")
    assert_close_rel(state[slot], s_hf[0], 1e-4, "prefill state vs HF")
    for t in range(L, L + 2):
        sl = slice(t, t + 1)
        o_hf, s_hf = hf_recurrent(p.q[None, sl], p.k[None, sl], p.v[None, sl], g[None, sl], beta[None, sl],
                                  initial_state=s_hf, output_final_state=True, use_qk_l2norm_in_kernel=True)
        o = ops.fused_recurrent_kda(p.q[sl], p.k[sl], p.v[sl], p.A_log, p.dt_bias, p.f[sl], p.b[sl], state,
                                    p.state_indices)
        assert_close_rel(o, o_hf[0], 1e-4, "decode output vs HF recurrent_kimi_delta_attention")
        assert_close_rel(state[slot], s_hf[0], 1e-4, "decode state vs HF")


# ------------------------------------------------------------------------------- errors, opcheck
@pytest.fixture
def ep():
    return make_kda([5, 3], 2, 32, 48)


def _chunk(p, **over):
    g, beta = p.gates()
    args = dict(q=p.q, k=p.k, v=p.v, g=g, beta=beta, state=p.state, state_indices=p.state_indices,
                cu_seqlens=p.cu_seqlens)
    args.update(over)
    return ops.chunk_kda(**args)


def _decode(p, **over):
    n = p.state_indices.shape[0]
    args = dict(q=p.q[:n], k=p.k[:n], v=p.v[:n], A_log=p.A_log, dt_bias=p.dt_bias, f=p.f[:n], b=p.b[:n],
                state=p.state, state_indices=p.state_indices)
    args.update(over)
    return ops.fused_recurrent_kda(**args)


CHUNK_ERRORS = [
    ("q dim", lambda p: dict(q=p.q[:, :, None]), ValueError, "'q' must be 3-D"),
    ("k shape", lambda p: dict(k=p.k[:, :1]), ValueError, "'k' must have shape"),
    ("v heads", lambda p: dict(v=torch.zeros(8, 4, 48)), ValueError, "'v' must have shape \\[8, 2, V\\]"),
    ("dtype mix", lambda p: dict(v=p.v.bfloat16()), TypeError, "share one dtype"),
    ("q stride", lambda p: dict(q=p.q.transpose(0, 2).contiguous().transpose(0, 2)), ValueError,
     "'q' must be contiguous in its last dim"),
    ("g dtype", lambda p: dict(g=p.gates()[0].double()), TypeError, "'g' must be float32"),
    ("g shape", lambda p: dict(g=p.gates()[0][:, :, :16]), ValueError, "'g' must have shape"),
    ("beta shape", lambda p: dict(beta=p.gates()[1][:3]), ValueError, "'beta' must have shape"),
    ("state shape", lambda p: dict(state=p.state[:, :, :16]), ValueError, "'state' must have shape"),
    ("state layout", lambda p: dict(state=p.state.transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
     "'state' must be contiguous within each slot"),
    ("state dtype", lambda p: dict(state=p.state.double()), TypeError, "'state' must be float32"),
    ("idx range", lambda p: dict(state_indices=torch.tensor([1, 99], dtype=torch.int32)), IndexError,
     "'state_indices' has 99"),
    ("idx dup", lambda p: dict(state_indices=torch.tensor([3, 3], dtype=torch.int32)), ValueError,
     "names slot 3 more than once"),
    ("cu end", lambda p: dict(cu_seqlens=torch.tensor([0, 5, 9], dtype=torch.int32)), ValueError, "beyond T=8"),
    ("out dtype", lambda p: dict(out=torch.empty(8, 2, 48, dtype=torch.bfloat16)), TypeError,
     "'out' must have q's dtype"),
]


@pytest.mark.error_path
@pytest.mark.parametrize("case", CHUNK_ERRORS, ids=lambda c: c[0])
def test_chunk_errors(ep, case):
    _, over, exc, msg = case
    before = ep.state.clone()
    with pytest.raises(exc, match=msg) as info:
        _chunk(ep, **over(ep))
    assert "chunk_kda" in str(info.value)
    assert torch.equal(ep.state, before)


DECODE_ERRORS = [
    ("f shape", lambda p: dict(f=p.f[:2, :, :16]), ValueError, "'f' must have shape"),
    ("b shape", lambda p: dict(b=p.b[:2, :1]), ValueError, "'b' must have shape"),
    ("A_log shape", lambda p: dict(A_log=p.A_log[:1]), ValueError, "'A_log' must have shape"),
    ("dt_bias shape", lambda p: dict(dt_bias=p.dt_bias[:32]), ValueError, "'dt_bias' must have shape \\[64\\]"),
    ("dt_bias dtype", lambda p: dict(dt_bias=p.dt_bias.int()), TypeError, "'dt_bias' must be float32"),
    ("too many seqs", lambda p: dict(state_indices=torch.tensor([0, 2, 4], dtype=torch.int32)), ValueError,
     "only T=2 tokens"),
]


@pytest.mark.error_path
@pytest.mark.parametrize("case", DECODE_ERRORS, ids=lambda c: c[0])
def test_decode_errors(ep, case):
    _, over, exc, msg = case
    before = ep.state.clone()
    with pytest.raises(exc, match=msg) as info:
        _decode(ep, **over(ep))
    assert "fused_recurrent_kda" in str(info.value)
    assert torch.equal(ep.state, before)


@pytest.mark.error_path
def test_gate_errors(ep):
    with pytest.raises(ValueError, match=re.escape("kda_gate: argument 'b' must have shape [8, 2]")):
        ops.kda_gate(ep.A_log, ep.f, ep.b[:, :1], ep.dt_bias)
    with pytest.raises(TypeError, match="kda_gate: argument 'f' must be float32"):
        ops.kda_gate(ep.A_log, ep.f.int(), ep.b, ep.dt_bias)


def test_opcheck():
    p = make_kda([70, 5], 2, 16, 24, torch.bfloat16, torch.float32)
    torch.library.opcheck(torch.ops.vllm_gdn_cpu.kda_gate.default, (p.A_log, p.f, p.b, p.dt_bias, None))
    torch.library.opcheck(torch.ops.vllm_gdn_cpu.kda_gate.default, (p.A_log, p.f, p.b, p.dt_bias, -5.0))
    g, beta = p.gates()
    torch.library.opcheck(
        torch.ops.vllm_gdn_cpu.chunk_kda.default,
        (p.q, p.k, p.v, g, beta, p.state, p.state_indices, p.cu_seqlens, torch.tensor([True, False]), 0.25, True,
         torch.empty_like(p.v)),
    )
    d = make_kda([1, 1, 1], 2, 16, 24, torch.float32, torch.bfloat16)
    torch.library.opcheck(
        torch.ops.vllm_gdn_cpu.fused_recurrent_kda.default,
        (d.q, d.k, d.v, d.A_log, d.dt_bias, d.f, d.b, d.state, d.state_indices, None, 0.25, True, None,
         torch.empty_like(d.v)),
    )
