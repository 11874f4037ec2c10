"""Bad input raises a Python exception that names the argument; nothing is written."""

import re

import pytest
import torch

from gdn_cases import forced_isa, make_problem
from vllm_gdn_cpu import ops

pytestmark = pytest.mark.error_path


@pytest.fixture
def p():
    return make_problem([5, 3], 2, 4, 32, 32, torch.float32, torch.float32)


def chunk(p, **over):
    g, beta = p.gates()
    args = dict(q=p.q, k=p.k, v=p.v, g=g, beta=beta, state=p.state, state_indices=p.state_indices,
                cu_seqlens=p.cu_seqlens)
    args.update(over)
    return ops.chunk_gated_delta_rule(**args)


def decode(p, **over):
    n = p.state_indices.shape[0]
    args = dict(q=p.q[:n], k=p.k[:n], v=p.v[:n], A_log=p.A_log, dt_bias=p.dt_bias, a=p.a[:n], b=p.b[:n],
                state=p.state, state_indices=p.state_indices)
    args.update(over)
    return ops.fused_recurrent_gated_delta_rule(**args)


CHUNK_CASES = [
    ("q", lambda p: dict(q=p.q[:, :, None]), ValueError, "'q' must be 3-D"),
    ("k", lambda p: dict(k=p.k[:, :1]), ValueError, "'k' must have shape"),
    ("v", lambda p: dict(v=p.v[:4]), ValueError, "'v' must have T=8"),
    ("v heads", lambda p: dict(v=torch.zeros(8, 3, 32)), ValueError, "multiple of q/k's"),
    ("dtype mix", lambda p: dict(v=p.v.bfloat16()), TypeError, "share one dtype"),
    ("int q", lambda p: dict(q=p.q.int(), k=p.k.int(), v=p.v.int()), TypeError, "'q' must be float32"),
    ("q stride", lambda p: dict(q=p.q.transpose(0, 2).contiguous().transpose(0, 2)), ValueError,
     "'q' must be contiguous in its last dim"),
    ("g dtype", lambda p: dict(g=p.gates()[0].double()), TypeError, "'g' must be float32"),
    ("beta shape", lambda p: dict(beta=p.gates()[1][:3]), ValueError, "'beta' must have shape"),
    ("state shape", lambda p: dict(state=p.state[:, :, :16]), ValueError, "'state' must have shape"),
    ("state layout", lambda p: dict(state=p.state.transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
     "'state' must be contiguous within each slot"),
    ("state dtype", lambda p: dict(state=p.state.double()), TypeError, "'state' must be float32"),
    ("idx dtype", lambda p: dict(state_indices=p.state_indices.long()), TypeError, "'state_indices' must be int32"),
    ("idx range", lambda p: dict(state_indices=torch.tensor([1, 99], dtype=torch.int32)), IndexError,
     "'state_indices' has 99 at position 1"),
    ("idx dup", lambda p: dict(state_indices=torch.tensor([3, 3], dtype=torch.int32)), ValueError,
     "names slot 3 more than once"),
    ("cu len", lambda p: dict(cu_seqlens=p.cu_seqlens[:2]), ValueError, "'cu_seqlens' must have N\\+1=3"),
    ("cu start", lambda p: dict(cu_seqlens=torch.tensor([1, 5, 8], dtype=torch.int32)), ValueError,
     "must start at 0"),
    ("cu order", lambda p: dict(cu_seqlens=torch.tensor([0, 6, 5], dtype=torch.int32)), ValueError,
     "non-decreasing"),
    ("cu end", lambda p: dict(cu_seqlens=torch.tensor([0, 5, 9], dtype=torch.int32)), ValueError,
     "beyond T=8"),
    ("cu dtype", lambda p: dict(cu_seqlens=p.cu_seqlens.long()), TypeError, "'cu_seqlens' must be int32"),
    ("has_init", lambda p: dict(has_initial_state=torch.tensor([1, 0])), TypeError,
     "'has_initial_state' must be bool"),
    ("out shape", lambda p: dict(out=torch.empty(8, 4, 16)), ValueError, "'out' must have shape"),
    ("out dtype", lambda p: dict(out=torch.empty(8, 4, 32, dtype=torch.bfloat16)), TypeError,
     "'out' must have q's dtype"),
]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=[c[0] for c in CHUNK_CASES])
def test_chunk_rejects(p, case):
    _, override, exc, message = case
    before = p.state.clone()
    with pytest.raises(exc, match=message):
        chunk(p, **override(p))
    assert torch.equal(p.state, before)


DECODE_CASES = [
    ("a shape", lambda p: dict(a=p.a[:2, :3]), ValueError, "'a' must have shape"),
    ("b dims", lambda p: dict(b=p.b[:2].flatten()), ValueError, "'b' must be 2-D"),
    ("A_log", lambda p: dict(A_log=p.A_log[:2]), ValueError, "'A_log' must have shape"),
    ("dt_bias dtype", lambda p: dict(dt_bias=p.dt_bias.int()), TypeError, "'dt_bias' must be float32"),
    ("too many seqs", lambda p: dict(state_indices=torch.arange(3, dtype=torch.int32)), ValueError,
     "only T=2 tokens"),
    ("softplus beta", lambda p: dict(softplus_beta=0.0), ValueError, "'softplus_beta' must be > 0"),
    ("cu", lambda p: dict(cu_seqlens=torch.tensor([0, 3, 1], dtype=torch.int32)), ValueError, "non-decreasing"),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_rejects(p, case):
    _, override, exc, message = case
    before = p.state.clone()
    with pytest.raises(exc, match=message):
        decode(p, **override(p))
    assert torch.equal(p.state, before)


def test_gating_rejects_mismatched_heads(p):
    with pytest.raises(ValueError, match="'dt_bias' must have shape"):
        ops.gdn_gating(p.A_log, p.a, p.b, p.dt_bias[:1])


def test_unknown_or_unsupported_isa_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ops.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=re.escape("VLLM_GDN_CPU_ISA=sse9 is not a known ISA")):
        ops.runtime_info()


def test_unknown_gemm_path_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ops.GEMM_ENV, "cublas")
    with pytest.raises(ValueError, match=re.escape("VLLM_GDN_CPU_GEMM=cublas is not a known GEMM path")):
        ops.runtime_info()


def test_forcing_amx_without_amx_is_a_clear_error(monkeypatch):
    # The cap makes any CPU one without AMX (on an AMX CPU forcing it would be legal).
    monkeypatch.setenv(ops.MAX_ISA_ENV, "avx512_bf16")
    monkeypatch.setenv(ops.GEMM_ENV, "amx")
    with pytest.raises(ValueError, match="VLLM_GDN_CPU_GEMM=amx: this CPU has no usable AMX-BF16"):
        ops.runtime_info()


def test_isa_cap_hides_newer_isas_and_amx(monkeypatch):
    """VLLM_GDN_CPU_MAX_ISA=avx2 makes this CPU look AVX2-only (how ci/test.sh emulates one)."""
    monkeypatch.setenv(ops.MAX_ISA_ENV, "avx2")
    info = ops.runtime_info()
    assert set(info["available_isas"]) <= {"avx2", "generic"} and "generic" in info["available_isas"]
    assert "amx" not in info["available_gemms"] and info["isa"] == info["available_isas"][0]
    assert info["gemm"].removesuffix("-fp32") in info["available_gemms"]
    monkeypatch.setenv(ops.ISA_ENV, "avx512")
    with pytest.raises(ValueError, match=re.escape("VLLM_GDN_CPU_ISA=avx512")):
        ops.runtime_info()


def test_unknown_isa_cap_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ops.MAX_ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=re.escape("VLLM_GDN_CPU_MAX_ISA=sse9 is not a known ISA")):
        ops.runtime_info()


def test_forcing_each_available_isa_is_reported():
    for isa in ops.runtime_info()["available_isas"]:
        with forced_isa(isa):
            assert ops.runtime_info()["isa"] == isa


# ----------------------------------------------------------------------------- Mamba2


@pytest.fixture
def m2():
    from mamba2_cases import make_m2

    return make_m2([5, 3], 4, 16, 2, 32, torch.float32, torch.float32, with_z=True)


def m2_scan(m, **over):
    args = dict(x=m.x, dt=m.dt, A=m.A, B=m.B, C=m.C, D=m.D, dt_bias=m.dt_bias, state=m.state,
                state_indices=m.state_indices, cu_seqlens=m.cu_seqlens, z=m.z)
    args.update(over)
    return ops.mamba2_chunk_scan(**args)


def m2_update(m, **over):
    args = dict(x=m.x[:2], dt=m.dt[:2], A=m.A, B=m.B[:2], C=m.C[:2], D=m.D, dt_bias=m.dt_bias, state=m.state,
                state_indices=m.state_indices, z=m.z[:2])
    args.update(over)
    return ops.mamba2_state_update(**args)


I32 = dict(dtype=torch.int32)
M2_COMMON_CASES = [
    ("x dims", lambda m, n: dict(x=m.x[:n].flatten(1)), ValueError, "'x' must be 3-D"),
    ("x dtype", lambda m, n: dict(x=m.x[:n].double()), TypeError, "'x' must be float32"),
    ("x stride", lambda m, n: dict(x=m.x[:n].transpose(0, 2).contiguous().transpose(0, 2)), ValueError,
     "'x' must be contiguous in its last dim"),
    ("dt shape", lambda m, n: dict(dt=m.dt[:n, :3]), ValueError, "'dt' must have shape"),
    ("dt dtype", lambda m, n: dict(dt=m.dt[:n].double()), TypeError, "'dt' must be float32"),
    ("B groups", lambda m, n: dict(B=torch.zeros(n, 3, 32), C=torch.zeros(n, 3, 32)), ValueError,
     "number of groups \\(3\\) that divides"),
    ("B tokens", lambda m, n: dict(B=m.B[: n - 1]), ValueError, "'B' must have T="),
    ("C shape", lambda m, n: dict(C=m.C[:n, :, :16]), ValueError, "'C' must have shape"),
    ("B dtype", lambda m, n: dict(B=m.B[:n].bfloat16()), TypeError, "'B' must have x's dtype"),
    ("z shape", lambda m, n: dict(z=m.z[:n, :2]), ValueError, "'z' must have shape"),
    ("A shape", lambda m, n: dict(A=m.A[:2]), ValueError, "'A' must have shape"),
    ("A positive", lambda m, n: dict(A=-m.A), ValueError, "'A' must be <= 0"),
    ("D shape", lambda m, n: dict(D=m.D[:3]), ValueError, "'D' must have shape"),
    ("dt_bias dtype", lambda m, n: dict(dt_bias=m.dt_bias.int()), TypeError, "'dt_bias' must be float32"),
    ("dt_limit", lambda m, n: dict(dt_limit=(0.5, 0.1)), ValueError, "'dt_limit' must satisfy 0 <= lo <= hi"),
    ("dt_limit neg", lambda m, n: dict(dt_limit=(-1.0, 1.0)), ValueError, "'dt_limit'"),
    ("state shape", lambda m, n: dict(state=m.state[:, :, :8]), ValueError, "'state' must have shape"),
    ("state layout", lambda m, n: dict(state=m.state.transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
     "'state' must be contiguous within each slot"),
    ("state dtype", lambda m, n: dict(state=m.state.double()), TypeError, "'state' must be float32"),
    ("idx range", lambda m, n: dict(state_indices=torch.tensor([1, 99], **I32)), IndexError,
     "'state_indices' has 99 at position 1"),
    ("idx dup", lambda m, n: dict(state_indices=torch.tensor([3, 3], **I32)), ValueError,
     "names slot 3 more than once"),
    ("idx dtype", lambda m, n: dict(state_indices=m.state_indices.long()), TypeError, "'state_indices' must be int32"),
    ("out dtype", lambda m, n: dict(out=torch.empty(n, 4, 16, dtype=torch.bfloat16)), TypeError,
     "'out' must have x's dtype"),
    ("out shape", lambda m, n: dict(out=torch.empty(n, 4, 8)), ValueError, "'out' must have shape"),
]

M2_SCAN_CASES = M2_COMMON_CASES + [
    ("cu len", lambda m, n: dict(cu_seqlens=m.cu_seqlens[:2]), ValueError, "'cu_seqlens' must have N\\+1=3"),
    ("cu end", lambda m, n: dict(cu_seqlens=torch.tensor([0, 5, 9], **I32)), ValueError, "beyond T=8"),
    ("has_init", lambda m, n: dict(has_initial_state=torch.tensor([1, 0])), TypeError,
     "'has_initial_state' must be bool"),
    ("ckpt alone", lambda m, n: dict(checkpoint_offsets=torch.tensor([1, 1], **I32)), ValueError,
     "'checkpoint_offsets' and 'checkpoint_slots' must be given together"),
    ("ckpt dtype", lambda m, n: dict(checkpoint_offsets=torch.tensor([1, 1]), checkpoint_slots=torch.tensor(
        [0, 2], **I32)), TypeError, "'checkpoint_offsets' must be int32"),
    ("ckpt beyond len", lambda m, n: dict(checkpoint_offsets=torch.tensor([1, 4], **I32), checkpoint_slots=torch.tensor(
        [0, 2], **I32)), ValueError, "'checkpoint_offsets' has 4 at position 1, outside \\[0, 3\\]"),
    ("ckpt slot range", lambda m, n: dict(checkpoint_offsets=torch.tensor([1, 1], **I32),
                                          checkpoint_slots=torch.tensor([0, 50], **I32)), IndexError,
     "'checkpoint_slots' has 50 at position 1"),
    ("ckpt slot in idx", lambda m, n: dict(checkpoint_offsets=torch.tensor([1, 1], **I32),
                                           checkpoint_slots=torch.tensor([0, 1], **I32)), ValueError,
     "'checkpoint_slots' names slot 1 at position 1, which is in state_indices"),
    ("ckpt slot dup", lambda m, n: dict(checkpoint_offsets=torch.tensor([1, 1], **I32),
                                        checkpoint_slots=torch.tensor([0, 0], **I32)), ValueError,
     "which is another checkpoint's slot"),
]

M2_UPDATE_CASES = M2_COMMON_CASES + [
    ("seq count", lambda m, n: dict(state_indices=torch.tensor([1], **I32)), ValueError,
     "'state_indices' must have one entry per sequence"),
]


@pytest.mark.parametrize("case", M2_SCAN_CASES, ids=[c[0] for c in M2_SCAN_CASES])
def test_mamba2_chunk_scan_rejects(m2, case):
    _, override, exc, message = case
    before = m2.state.clone()
    with pytest.raises(exc, match=message):
        m2_scan(m2, **override(m2, 8))
    assert torch.equal(m2.state, before)


@pytest.mark.parametrize("case", M2_UPDATE_CASES, ids=[c[0] for c in M2_UPDATE_CASES])
def test_mamba2_state_update_rejects(m2, case):
    _, override, exc, message = case
    before = m2.state.clone()
    with pytest.raises(exc, match=message):
        m2_update(m2, **override(m2, 2))
    assert torch.equal(m2.state, before)


# ----------------------------------------------------------------------------- Mamba-1


@pytest.fixture
def m1():
    from mamba1_cases import make_m1

    return make_m1([5, 3], 37, 16, torch.float32, torch.float32)


def m1_scan(m, **over):
    args = dict(x=m.x, dt=m.dt, A=m.A, B=m.B, C=m.C, D=m.D, z=m.z, dt_bias=m.dt_bias, state=m.state,
                state_indices=m.state_indices, cu_seqlens=m.cu_seqlens)
    args.update(over)
    return ops.selective_scan(**args)


def m1_update(m, **over):
    args = dict(x=m.x[:2], dt=m.dt[:2], A=m.A, B=m.B[:2], C=m.C[:2], D=m.D, z=m.z[:2], dt_bias=m.dt_bias,
                state=m.state, state_indices=m.state_indices)
    args.update(over)
    return ops.selective_state_update(**args)


M1_COMMON_CASES = [
    ("x dims", lambda m, n: dict(x=m.x[:n, None]), ValueError, "'x' must be 2-D"),
    ("x dtype", lambda m, n: dict(x=m.x[:n].double()), TypeError, "'x' must be float32"),
    ("x stride", lambda m, n: dict(x=m.x[:n].t().contiguous().t()), ValueError,
     "'x' must be contiguous in its last dim"),
    ("x empty", lambda m, n: dict(x=m.x[:n, :0]), ValueError, "'x' must have at least one channel"),
    ("dt shape", lambda m, n: dict(dt=m.dt[:n, :3]), ValueError, "'dt' must have shape"),
    ("dt dtype", lambda m, n: dict(dt=m.dt[:n].double()), TypeError, "'dt' must be float32"),
    ("dt stride", lambda m, n: dict(dt=m.dt[:n].t().contiguous().t()), ValueError,
     "'dt' must be contiguous in its last dim"),
    ("A shape", lambda m, n: dict(A=m.A[:5]), ValueError, "'A' must have shape \\[Dm=37, N\\]"),
    ("A dims", lambda m, n: dict(A=m.A[:, 0]), ValueError, "'A' must be 2-D"),
    ("B tokens", lambda m, n: dict(B=m.B[: n - 1]), ValueError, "'B' must have shape"),
    ("C d_state", lambda m, n: dict(C=m.C[:n, :8]), ValueError, "'C' must have shape"),
    ("B dtype", lambda m, n: dict(B=m.B[:n].bfloat16()), TypeError, "'B' must have x's dtype Float or float32, got BFloat16"),
    ("C stride", lambda m, n: dict(C=m.C[:n].t().contiguous().t()), ValueError,
     "'C' must be contiguous in its last dim"),
    ("z shape", lambda m, n: dict(z=m.z[:n, :2]), ValueError, "'z' must have shape"),
    ("z dtype", lambda m, n: dict(z=m.z[:n].bfloat16()), TypeError, "'z' must have x's dtype"),
    ("D shape", lambda m, n: dict(D=m.D[:3]), ValueError, "'D' must have shape"),
    ("dt_bias dtype", lambda m, n: dict(dt_bias=m.dt_bias.int()), TypeError, "'dt_bias' must be float32"),
    ("state shape", lambda m, n: dict(state=m.state[:, :, :8]), ValueError, "'state' must have shape"),
    ("state dims", lambda m, n: dict(state=m.state[:, None]), ValueError, "'state' must be 3-D"),
    ("state layout", lambda m, n: dict(state=m.state.transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
     "'state' must be contiguous within each slot"),
    ("state dtype", lambda m, n: dict(state=m.state.double()), TypeError, "'state' must be float32"),
    ("idx range", lambda m, n: dict(state_indices=torch.tensor([1, 99], **I32)), IndexError,
     "'state_indices' has 99 at position 1"),
    ("idx dup", lambda m, n: dict(state_indices=torch.tensor([3, 3], **I32)), ValueError,
     "names slot 3 more than once"),
    ("idx dtype", lambda m, n: dict(state_indices=m.state_indices.long()), TypeError, "'state_indices' must be int32"),
    ("out dtype", lambda m, n: dict(out=torch.empty(n, 37, dtype=torch.bfloat16)), TypeError,
     "'out' must have x's dtype"),
    ("out shape", lambda m, n: dict(out=torch.empty(n, 36)), ValueError, "'out' must have shape"),
]

M1_SCAN_CASES = M1_COMMON_CASES + [
    ("cu len", lambda m, n: dict(cu_seqlens=m.cu_seqlens[:2]), ValueError, "'cu_seqlens' must have N\\+1=3"),
    ("cu end", lambda m, n: dict(cu_seqlens=torch.tensor([0, 5, 9], **I32)), ValueError, "beyond T=8"),
    ("has_init", lambda m, n: dict(has_initial_state=torch.tensor([1, 0])), TypeError,
     "'has_initial_state' must be bool"),
    ("ckpt alone", lambda m, n: dict(checkpoint_slots=torch.tensor([0, 2], **I32)), ValueError,
     "'checkpoint_offsets' and 'checkpoint_slots' must be given together"),
    ("ckpt dtype", lambda m, n: dict(checkpoint_offsets=torch.tensor([1, 1]), checkpoint_slots=torch.tensor(
        [0, 2], **I32)), TypeError, "'checkpoint_offsets' must be int32"),
    ("ckpt beyond len", lambda m, n: dict(checkpoint_offsets=torch.tensor([1, 4], **I32), checkpoint_slots=torch.tensor(
        [0, 2], **I32)), ValueError, "'checkpoint_offsets' has 4 at position 1, outside \\[0, 3\\]"),
    ("ckpt slot range", lambda m, n: dict(checkpoint_offsets=torch.tensor([1, 1], **I32),
                                          checkpoint_slots=torch.tensor([0, 50], **I32)), IndexError,
     "'checkpoint_slots' has 50 at position 1"),
    ("ckpt slot in idx", lambda m, n: dict(checkpoint_offsets=torch.tensor([1, 1], **I32),
                                           checkpoint_slots=torch.tensor([0, 1], **I32)), ValueError,
     "'checkpoint_slots' names slot 1 at position 1, which is in state_indices"),
    ("ckpt slot dup", lambda m, n: dict(checkpoint_offsets=torch.tensor([1, 1], **I32),
                                        checkpoint_slots=torch.tensor([0, 0], **I32)), ValueError,
     "which is another checkpoint's slot"),
]

M1_UPDATE_CASES = M1_COMMON_CASES + [
    ("seq count", lambda m, n: dict(state_indices=torch.tensor([1], **I32)), ValueError,
     "'state_indices' must have one entry per sequence"),
]


@pytest.mark.parametrize("case", M1_SCAN_CASES, ids=[c[0] for c in M1_SCAN_CASES])
def test_mamba1_selective_scan_rejects(m1, case):
    _, override, exc, message = case
    before = m1.state.clone()
    with pytest.raises(exc, match=message):
        m1_scan(m1, **override(m1, 8))
    assert torch.equal(m1.state, before)


@pytest.mark.parametrize("case", M1_UPDATE_CASES, ids=[c[0] for c in M1_UPDATE_CASES])
def test_mamba1_selective_state_update_rejects(m1, case):
    _, override, exc, message = case
    before = m1.state.clone()
    with pytest.raises(exc, match=message):
        m1_update(m1, **override(m1, 2))
    assert torch.equal(m1.state, before)
