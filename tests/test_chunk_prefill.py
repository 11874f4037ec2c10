"""chunk_gated_delta_rule (prefill) against the float64 token-by-token reference, and its two schedules
(sequential, chunk_parallel) against each other."""

import os
from contextlib import contextmanager

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


# ----------------------------------------------------------------------------- schedules
# VLLM_GDN_CPU_PREFILL_SCHEDULE=sequential walks each (sequence, head) task's chunks in order;
# chunk_parallel prepares every chunk in parallel and then runs only the state pass in order, split
# over state column blocks (kernels/gdn/chunk_parallel.cpp). Both run the same per-chunk calls on the
# same operands in the same order; only the GEMM kernels' code for a narrower column block may
# differ in FMA contraction (seen with GCC 13 on the fp32 micro-kernels), and an external BLAS
# (torch's MKL, OpenBLAS) picks its blocking, hence its summation order, from the operands' shapes.
# Each such difference is a few fp32 roundings (~1e-7 relative) per product, a handful of products
# chained per chunk, carried through the state over the chunks: 1e-5 relative to the largest
# entry; then the output's one rounding to its dtype (2^-8 bf16, 2^-11 fp16) on top. On this
# machine and compiler the two schedules were bit-identical on our own engines.


@contextmanager
def forced_schedule(schedule: str):
    """Forces VLLM_GDN_CPU_PREFILL_SCHEDULE within a with-block; on leaving, checks that every
    prefill call inside ran that schedule (the kernel counts what it ran)."""
    old = os.environ.get(ops.PREFILL_SCHEDULE_ENV)
    before = ops.prefill_schedule_counts()
    os.environ[ops.PREFILL_SCHEDULE_ENV] = schedule
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ops.PREFILL_SCHEDULE_ENV, None)
        else:
            os.environ[ops.PREFILL_SCHEDULE_ENV] = old
    after = ops.prefill_schedule_counts()
    ran = {name for name in after if after[name] > before[name]}
    assert ran == {schedule}, f"{ops.PREFILL_SCHEDULE_ENV}={schedule}: calls ran {ran}"


@contextmanager
def output_tasks_off():
    """VLLM_GDN_CPU_PREFILL_OUTPUT_TASKS=0: chunk_parallel computes the output rows in the state-pass
    steps (the A/B alternative to its output tasks) within a with-block."""
    os.environ["VLLM_GDN_CPU_PREFILL_OUTPUT_TASKS"] = "0"
    try:
        yield
    finally:
        os.environ.pop("VLLM_GDN_CPU_PREFILL_OUTPUT_TASKS")


def run_prefill(p, g, beta, has_initial_state=None):
    state = p.state.clone()
    out = ops.chunk_gated_delta_rule(p.q, p.k, p.v, g, beta, state, p.state_indices, p.cu_seqlens,
                                     has_initial_state=has_initial_state)
    return out, state


def assert_schedules_agree(a, b, what: str):
    (out_a, state_a), (out_b, state_b) = a, b
    rounding = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}
    assert_close_rel(state_b, state_a, 1e-5 + rounding[state_a.dtype], f"{what}: final state")
    assert_close_rel(out_b, out_a, 1e-5 + rounding[out_a.dtype], f"{what}: output")


# (seqlens, Hk, Hv, K, V). At 1-4 threads the long ones span several windows of chunks (a window
# holds ~1 MiB of per-chunk results per thread), so the state is carried between windows, and the
# varlen ones have sequences that cross a window's end; padded (-1) and empty sequences and
# sequences without an initial state are set below.
SCHEDULE_SHAPES = [
    ([1000], 1, 1, 64, 64),
    ([700], 1, 4, 64, 128),             # GQA 4, K != V: 2-4 column blocks of the state pass
    ([1, 64, 0, 5, 300, 130, 37], 2, 4, 64, 128),
    ([65, 3, 190], 1, 2, 96, 192),      # V = 192: column blocks of 48/64/96 (multiples of 16)
    ([61, 3], 1, 2, 8, 8),              # V below one column block
    ([129], 2, 2, 32, 40),              # V = 40: a partial vector at the end of the last block
]


def schedule_problem(shape, dtype, state_dtype, seed):
    seqlens, Hk, Hv, K, V = shape
    p = make_problem(seqlens, Hk, Hv, K, V, dtype, state_dtype, seed=seed, strided=True)
    N = len(seqlens)
    has_init = torch.ones(N, dtype=torch.bool)
    if N > 2:
        p.state_indices[1] = -1  # padding
        has_init[N - 1] = False
        has_init[2] = False      # the empty sequence (length 0) of the varlen shape, if any
    return p, has_init


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("gemm", gemms())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SCHEDULE_SHAPES, ids=lambda s: f"{len(s[0])}seq{max(s[0])}-h{s[1]}/{s[2]}-k{s[3]}v{s[4]}")
def test_chunk_parallel_matches_sequential(threads, gemm, dtype, shape):
    p, has_init = schedule_problem(shape, dtype, torch.float32, seed=11)
    g, beta = p.gates()
    with torch_threads(threads), forced_gemm(gemm):
        with forced_schedule("sequential"):
            seq = run_prefill(p, g, beta, has_init)
        with forced_schedule("chunk_parallel"):
            par = run_prefill(p, g, beta, has_init)  # the output rows as tasks off the chains (default)
            with output_tasks_off():
                fused = run_prefill(p, g, beta, has_init)  # the output rows inside the chains' steps
    assert_schedules_agree(seq, par, f"{gemm} {threads} threads")
    assert_schedules_agree(seq, fused, f"{gemm} {threads} threads, output tasks off")
    if len(shape[0]) > 2:  # padding: zero output, its slot and every slot not named untouched
        cu = p.cu_seqlens.tolist()
        assert (par[0][cu[1] : cu[2]] == 0).all()
        named = [s for s in p.state_indices.tolist() if s >= 0]
        untouched = [s for s in range(p.state.shape[0]) if s not in named]
        assert torch.equal(par[1][untouched], p.state[untouched])


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("shape", SCHEDULE_SHAPES[:4], ids=lambda s: f"{len(s[0])}seq{max(s[0])}-h{s[2]}")
def test_chunk_parallel_against_reference_all_isas(isa, shape):
    """Against the float64 reference (not only the other schedule), every ISA, 2 threads."""
    p, has_init = schedule_problem(shape, torch.float32, torch.float32, seed=12)
    with torch_threads(2), forced_isa(isa), forced_schedule("chunk_parallel"):
        run_and_compare(p, torch.float32, torch.float32, has_initial_state=has_init)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("state_dtype", DTYPES, ids=DTYPE_IDS.get)
def test_chunk_parallel_dtypes(dtype, state_dtype):
    """Every input dtype x state dtype (the state is rounded once, at the end of its sequence, also
    when the sequence spans several windows), against the reference and the sequential schedule."""
    p, has_init = schedule_problem(SCHEDULE_SHAPES[2], dtype, state_dtype, seed=13)
    with torch_threads(3):
        with forced_schedule("chunk_parallel"):
            par = run_and_compare(p, dtype, state_dtype, has_initial_state=has_init)
        with forced_schedule("sequential"):
            seq = run_and_compare(p, dtype, state_dtype, has_initial_state=has_init)
    assert_schedules_agree(seq, par, "auto GEMM path")


@pytest.mark.parametrize("schedule", ["sequential", "chunk_parallel"])
def test_prefill_extreme_decays(schedule):
    """g = 0 (no decay), tiny, and down to -200 per token (a chunk's total decay far below the -80
    where exp(-gc) would overflow: the per-entry exp path), with beta up to 2 (negative
    eigenvalues): no exponent is ever positive, so the result stays finite and exact."""
    p = make_problem([300, 70], 1, 2, 64, 64, torch.float32, torch.float32, seed=14)
    g, beta = p.gates(allow_neg_eigval=True)
    T = g.shape[0]
    pattern = torch.tensor([0.0, -1e-6, -200.0, -3.0, 0.0, -60.0])
    g = pattern.repeat(T // len(pattern) + 1)[:T, None].expand(T, 2).contiguous()
    g[:, 1] = torch.where(torch.arange(T) < 150, 0.0, -0.9)  # head 1: no decay for 150 tokens
    state_ref = p.state.double()
    expected = chunk_gated_delta_rule_ref(p.q, p.k, p.v, g, beta, state_ref, p.state_indices, p.cu_seqlens,
                                          compute_dtype=torch.float64)
    with torch_threads(2), forced_schedule(schedule):
        out, state = run_prefill(p, g, beta)
    assert_close_rel(out, expected, 1e-4, "output")
    assert_close_rel(state, state_ref, 1e-4, "final state")


def test_auto_schedule_choice():
    """auto runs chunk_parallel when the sequential tasks would leave threads idle, else sequential."""
    def schedule_of(seqlens, H, threads):
        p = make_problem(seqlens, H, H, 32, 32, torch.float32, torch.float32, seed=15)
        g, beta = p.gates()
        before = ops.prefill_schedule_counts()
        with torch_threads(threads):
            run_prefill(p, g, beta)
        after = ops.prefill_schedule_counts()
        return [name for name in after if after[name] > before[name]]

    assert schedule_of([512], 1, 1) == ["sequential"]  # one thread: nothing to balance
    assert schedule_of([512], 1, 2) == ["chunk_parallel"]  # one task, two threads
    assert schedule_of([512], 4, 4) == ["sequential"]  # a task per thread
    assert schedule_of([512], 4, 3) == ["chunk_parallel"]  # 4 tasks on 3 threads: one does 2 (1.5x)
    assert schedule_of([64] * 8, 1, 4) == ["sequential"]  # 8 equal sequences on 4 threads
    assert schedule_of([2000, 64, 64, 64], 1, 4) == ["chunk_parallel"]  # one long prompt beside short ones


def test_unknown_schedule_is_a_clear_error():
    p = make_problem([10], 1, 1, 16, 16, torch.float32, torch.float32)
    g, beta = p.gates()
    os.environ[ops.PREFILL_SCHEDULE_ENV] = "bogus"
    try:
        with pytest.raises(ValueError, match=f"{ops.PREFILL_SCHEDULE_ENV}=bogus"):
            run_prefill(p, g, beta)
    finally:
        os.environ.pop(ops.PREFILL_SCHEDULE_ENV, None)


@pytest.mark.parametrize("threads", [1, 3])
def test_chunk_parallel_phase_timers(threads):
    """VLLM_GDN_CPU_PREFILL_PHASES=1 (bench prefill --phases) counts every preparation task (chunk,
    key head) and state-pass step (chunk, value head, column block) of a call once, leaves the
    results unchanged, and off (the default) records nothing."""
    seqlens, Hk, Hv, K, V = [1, 64, 0, 5, 300, 130, 37], 2, 4, 64, 128
    p, has_init = schedule_problem((seqlens, Hk, Hv, K, V), torch.float32, torch.float32, seed=17)
    g, beta = p.gates()
    chunks = sum((n + 63) // 64 for i, n in enumerate(seqlens) if i != 1)  # sequence 1 is padding
    names = ["calls", "wall", "prepare", "pass", "wait", "start", "end", "busiest_pass", "prepare_tasks",
             "pass_steps", "threads", "regions", "output", "output_tasks"]
    torch.ops.vllm_gdn_cpu.prefill_phase_times(True)
    with torch_threads(threads), forced_schedule("chunk_parallel"):
        plain = run_prefill(p, g, beta, has_init)
        assert torch.ops.vllm_gdn_cpu.prefill_phase_times(True) == [0.0] * len(names)
        os.environ["VLLM_GDN_CPU_PREFILL_PHASES"] = "1"
        try:
            timed = run_prefill(p, g, beta, has_init)
        finally:
            os.environ.pop("VLLM_GDN_CPU_PREFILL_PHASES")
    ph = dict(zip(names, torch.ops.vllm_gdn_cpu.prefill_phase_times(True)))
    assert torch.equal(plain[0], timed[0]) and torch.equal(plain[1], timed[1])
    assert ph["calls"] == 1 and ph["regions"] == 1 and 1 <= ph["threads"] <= threads
    assert ph["prepare_tasks"] == chunks * Hk
    assert ph["pass_steps"] > 0 and ph["pass_steps"] % (chunks * Hv) == 0  # every column block passes every chunk
    assert ph["prepare"] > 0 and ph["pass"] > 0 and 0 < ph["busiest_pass"] <= ph["pass"]
    assert ph["wall"] > 0
    assert ph["output_tasks"] == chunks * Hv and ph["output"] > 0  # one per (chunk, value head)
