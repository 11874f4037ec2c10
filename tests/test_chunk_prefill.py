"""chunk_gated_delta_rule (prefill) against the float64 token-by-token reference."""

import pytest
import torch

from gdn_cases import (DTYPE_IDS, DTYPES, assert_close_rel, forced_gemm, forced_isa, gemms, isas, make_problem,
                       prefill_rtols, torch_threads)
from vllm_gdn_cpu import ops
from vllm_gdn_cpu.reference import chunk_gated_delta_rule_ref

# (seqlens, Hk, Hv, K, V): chunk boundaries (63/64/65, 200, 1000), varlen with length-1
# sequences, GQA 1 and 2, K != V (64/128, 96/192).
SHAPES = [
    ([1], 2, 4, 64, 64),
    ([63], 2, 2, 64, 64),
    ([64], 2, 4, 64, 128),
    ([65], 1, 2, 96, 192),
    ([200], 2, 4, 32, 64),
    ([1000], 1, 2, 64, 64),
    ([1, 64, 5, 130, 1], 2, 4, 64, 128),
    ([17, 1, 129], 1, 1, 96, 192),
    # head dims far below the chunk: the chunk-sized products (C x C) outgrow the head-sized ones
    # (the bf16 operand buffer was once sized by the head dims only and overflowed on AMX)
    ([61, 3], 1, 2, 8, 8),
]


def run_and_compare(p, dtype, state_dtype, has_initial_state=None, **kw):
    g, beta = p.gates()
    state_ref = p.state.double()
    expected = chunk_gated_delta_rule_ref(
        p.q, p.k, p.v, g, beta, state_ref, p.state_indices, p.cu_seqlens,
        has_initial_state=has_initial_state, compute_dtype=torch.float64, **kw,
    )
    state = p.state.clone()
    out = ops.chunk_gated_delta_rule(
        p.q, p.k, p.v, g, beta, state, p.state_indices, p.cu_seqlens,
        has_initial_state=has_initial_state, **kw,
    )
    assert out.dtype == dtype and out.shape == p.v.shape
    out_rtol, state_rtol = prefill_rtols(dtype, state_dtype)
    assert_close_rel(out, expected, out_rtol, "output")
    assert_close_rel(state, state_ref, state_rtol, "final state")
    return state, out


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-h{s[1]}/{s[2]}-k{s[3]}v{s[4]}")
def test_prefill_fp32_all_isas(isa, shape):
    seqlens, Hk, Hv, K, V = shape
    p = make_problem(seqlens, Hk, Hv, K, V, torch.float32, torch.float32, strided=True)
    with forced_isa(isa):
        run_and_compare(p, torch.float32, torch.float32)


# Every GEMM engine this machine runs (VLLM_GDN_CPU_GEMM), in fp32 and bf16 (bf16 products where the
# engine has them), over partial chunks, varlen, GQA and K != V.
GEMM_SHAPES = [([1, 64, 5, 130, 37], 2, 4, 64, 128), ([200], 1, 1, 96, 192), ([65], 2, 2, 32, 48)]


@pytest.mark.parametrize("gemm", gemms())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: f"{len(s[0])}seq-k{s[3]}v{s[4]}")
def test_prefill_every_gemm_path(gemm, dtype, shape):
    seqlens, Hk, Hv, K, V = shape
    p = make_problem(seqlens, Hk, Hv, K, V, dtype, torch.float32, seed=7, strided=True)
    with forced_gemm(gemm):
        run_and_compare(p, dtype, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("state_dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("seqlens", [[65], [1, 64, 130]], ids=["65", "varlen"])
def test_prefill_dtypes(dtype, state_dtype, seqlens):
    p = make_problem(seqlens, 2, 4, 64, 128, dtype, state_dtype, seed=1)
    run_and_compare(p, dtype, state_dtype)


@pytest.mark.parametrize("isa", isas())
def test_prefill_without_initial_state_and_padding(isa):
    """has_initial_state False starts from zeros; PAD entries (-1) touch nothing and output zeros."""
    p = make_problem([70, 3, 64, 9], 2, 4, 64, 64, torch.float32, torch.float32, seed=2)
    p.state_indices[1] = -1
    has_init = torch.tensor([True, True, False, False])
    untouched = [s for s in range(p.state.shape[0]) if s not in p.state_indices.tolist()]
    with forced_isa(isa):
        state, out = run_and_compare(p, torch.float32, torch.float32, has_initial_state=has_init)
    cu = p.cu_seqlens.tolist()
    assert (out[cu[1] : cu[2]] == 0).all(), "padded sequence output must be zero"
    assert torch.equal(state[untouched], p.state[untouched]), "slots not named were modified"


def test_prefill_options_scale_no_l2norm_and_out():
    p = make_problem([40, 90], 1, 2, 32, 48, torch.float32, torch.float32, seed=3)
    g, beta = p.gates()
    out = torch.full((p.v.shape[0], 2, 64), float("nan"))[:, :, :48]  # strided: head stride 64
    state_ref = p.state.double()
    expected = chunk_gated_delta_rule_ref(
        p.q * 0.1, p.k * 0.1, p.v, g, beta, state_ref, p.state_indices, p.cu_seqlens,
        scale=0.3, use_qk_l2norm=False, compute_dtype=torch.float64,
    )
    state = p.state.clone()
    res = ops.chunk_gated_delta_rule(
        p.q * 0.1, p.k * 0.1, p.v, g, beta, state, p.state_indices, p.cu_seqlens,
        scale=0.3, use_qk_l2norm=False, out=out,
    )
    assert res is out
    assert_close_rel(out, expected, 1e-4, "output")
    assert_close_rel(state, state_ref, 1e-4, "final state")


def test_prefill_trailing_tokens_zeroed():
    """Tokens after cu_seqlens[-1] belong to no sequence: their output rows are zero, not garbage."""
    p = make_problem([10, 20], 1, 2, 32, 32, torch.float32, torch.float32, seed=4)
    g, beta = p.gates()
    cu = torch.tensor([0, 10, 25], dtype=torch.int32)  # last 5 tokens uncovered
    out = torch.full_like(p.v, 7.0)
    ops.chunk_gated_delta_rule(p.q, p.k, p.v, g, beta, p.state.clone(), p.state_indices, cu, out=out)
    assert (out[25:] == 0).all()


def test_prefill_negative_eigenvalues():
    """beta in (0, 2) (allow_neg_eigval) keeps the chunked solve exact."""
    p = make_problem([150], 2, 2, 64, 64, torch.float32, torch.float32, seed=5)
    g, beta = p.gates(allow_neg_eigval=True)
    assert beta.max() > 1.0
    state_ref = p.state.double()
    expected = chunk_gated_delta_rule_ref(
        p.q, p.k, p.v, g, beta, state_ref, p.state_indices, p.cu_seqlens, compute_dtype=torch.float64
    )
    state = p.state.clone()
    out = ops.chunk_gated_delta_rule(p.q, p.k, p.v, g, beta, state, p.state_indices, p.cu_seqlens)
    assert_close_rel(out, expected, 1e-4, "output")
    assert_close_rel(state, state_ref, 1e-4, "final state")


@pytest.mark.parametrize("gemm", gemms())
def test_grouped_value_heads_match_one_head_per_task(gemm):
    """The value heads of one key head run as one task (sharing q k^T, k k^T) when the thread count
    divides the tasks evenly, else one head per task: both give bit-identical results on our own
    GEMM engines. An external BLAS (torch's MKL, OpenBLAS) picks its blocking from the operands'
    shapes and strides, which differ between the two schedules: MKL's AVX2 code path (AVX2-only
    CPUs, or MKL_ENABLE_INSTRUCTIONS=AVX2) then sums in another order, so there the results agree to
    one rounding of the output dtype instead."""
    p = make_problem([70, 1, 130], 3, 6, 64, 64, torch.bfloat16, torch.float32, seed=3, strided=True)
    g, beta = p.gates()
    results = []
    # 9 grouped tasks: 1 and 3 threads group them (evenly divided), 4 threads run the 18 heads
    # one by one (9 tasks would leave them unevenly loaded).
    for threads in (1, 3, 4):
        with torch_threads(threads), forced_gemm(gemm):
            state = p.state.clone()
            out = ops.chunk_gated_delta_rule(p.q, p.k, p.v, g, beta, state, p.state_indices, p.cu_seqlens)
        results.append((out, state))
    for out, state in results[1:]:
        if gemm in ("torch", "openblas"):
            # fp32 state: a different summation order; bf16 output: at most one bf16 rounding apart.
            torch.testing.assert_close(state, results[0][1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out.float(), results[0][0].float(), rtol=2**-7, atol=1e-5)
        else:
            assert torch.equal(out, results[0][0]) and torch.equal(state, results[0][1])
