"""Small-batch linear engine (ops.small_linear) and the dispatcher (ops.linear) vs a float64
reference and torch's matmul, on every ISA path, all dtype combinations, odd sizes and strides.

Tolerance (per element, a worst-case bound rather than a fitted figure): the kernel reads the same
rounded inputs as the float64 reference (bf16/fp16 widen to fp32 exactly), multiplies in fp32 and
sums the K products and the bias in fp32 in some order; any such order errs by at most
gamma_{K+1} = (K+1) u / (1 - (K+1) u) times sum_k |x_k w_k| + |b| (u = 2^-24; we allow 2 (K+2) u).
The result is then rounded once to out's dtype: at most half an ulp of |ref| (2^-8 bf16, 2^-11
fp16, 2^-24 fp32), with a factor 2 margin, plus the smallest fp16 subnormal step."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from gdn_cases import DTYPE_IDS, DTYPES, forced_gemm, forced_isa, gemms, isas, torch_threads
from vllm_gdn_cpu import ops, reference

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ISAS = isas()


def check(out: torch.Tensor, x, w, b=None) -> None:
    ref = reference.linear_ref(x, w, b, out_dtype=torch.float64)
    bound = (x.double().abs() @ w.double().abs().T)
    if b is not None:
        bound = bound + b.double().abs()
    K = x.shape[1]
    tol = 2 * (K + 2) * 2.0**-24 * bound + 2 * UNIT_ROUNDOFF[out.dtype] * ref.abs() + 6e-8
    err = (out.double() - ref).abs()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite values"
    worst = (err - tol).argmax()
    assert (err <= tol).all(), (f"max excess at {divmod(worst.item(), ref.shape[1])}: err "
                                f"{err.flatten()[worst].item():.3g} > tol {tol.flatten()[worst].item():.3g}")


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wdtype", DTYPES, ids=DTYPE_IDS.get)
def test_odd_sizes_every_isa(isa, wdtype):
    """K = 1..67 (every vector tail), odd N (row-block tails), M = 1..20 and 33 (token-tile tails)."""
    with forced_isa(isa):
        for K in range(1, 68):
            x, w = rand(3, K, seed=K), rand(17, K, dtype=wdtype, seed=100 + K)
            check(ops.small_linear(x, w), x, w)
        for M in list(range(1, 21)) + [33]:
            x, w, b = rand(M, 131, seed=M), rand(13, 131, dtype=wdtype, seed=M + 1), rand(13, seed=M + 2)
            check(ops.small_linear(x, w, b), x, w, b)
        for N in (1, 2, 3, 5, 17, 64, 257):
            x, w = rand(5, 1007, seed=N), rand(N, 1007, dtype=wdtype, seed=N + 1)
            check(ops.small_linear(x, w), x, w)
        # K past one column chunk (1024) and a tail of it
        x, w = rand(6, 2 * 1024 + 37), rand(9, 2 * 1024 + 37, dtype=wdtype, seed=3)
        check(ops.small_linear(x, w), x, w)


@pytest.mark.parametrize("isa", ISAS)
def test_all_dtype_combinations(isa):
    """x, weight, bias and out each fp32/bf16/fp16 (x and bias of any float dtype, out of any)."""
    with forced_isa(isa):
        for xd, wd, bd, od in itertools.product(DTYPES, DTYPES, DTYPES, DTYPES):
            x, w, b = rand(5, 70, dtype=xd, seed=1), rand(11, 70, dtype=wd, seed=2), rand(11, dtype=bd, seed=3)
            out = torch.empty(5, 11, dtype=od)
            ops.small_linear(x, w, b, out=out)
            check(out, x, w, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("wdtype", DTYPES, ids=DTYPE_IDS.get)
def test_threads_and_tp_shard_shapes(threads, wdtype):
    """Tensor-parallel shards of Qwen3-Next's projections (hidden 1024: qkvz+ba 12352 rows, out_proj
    K = 4096, ba 64 rows) over 2 and 4 ranks, split over 1 and 2 threads; M up to 16."""
    shapes = [(12352 // 2, 1024), (12352 // 4, 1024), (1024, 4096 // 2), (1024, 4096 // 4), (32, 1024), (16, 1024)]
    with torch_threads(threads):
        for (N, K), M in zip(shapes, [1, 4, 16, 3, 7, 16]):
            x, w, b = rand(M, K, dtype=wdtype, seed=N), rand(N, K, dtype=wdtype, seed=K), rand(N, seed=M)
            check(ops.small_linear(x, w, b), x, w, b)


@pytest.mark.parametrize("isa", ISAS)
def test_strided_x_and_out_write_only_their_elements(isa):
    """x rows and out rows strided (slices of wider buffers, as the layer writes into slices): the
    result is right and no element of out's buffer outside the slice changes."""
    with forced_isa(isa):
        for dtype in DTYPES:
            xbuf = rand(7, 300, dtype=dtype)
            x = xbuf[:, 13:13 + 257]
            w = rand(37, 257, dtype=dtype, seed=5)
            obuf = torch.full((7, 100), 7.0, dtype=dtype)
            out = obuf[:, 11:11 + 37]
            ops.small_linear(x, w, out=out)
            check(out, x, w)
            mask = torch.ones_like(obuf, dtype=torch.bool)
            mask[:, 11:48] = False
            assert (obuf[mask] == 7.0).all()


@pytest.mark.parametrize("gemm", ["amx", "avx512"])
def test_bf16_amx_path_and_its_fallback(gemm):
    """bf16 x and weight: the AMX tile path (VLLM_GDN_CPU_GEMM=amx with the avx512_bf16 kernels) over
    M = 1..33 (token groups of 16 and 32, padding), row counts off the 16/32-row tiles, K off the
    32-column tiles, out dtypes and strides; with the GEMM engine forced elsewhere the same calls run
    the vector kernel."""
    if gemm not in gemms() or "avx512_bf16" not in ISAS:
        pytest.skip(f"this CPU/build has no {gemm} GEMM path with the avx512_bf16 kernels (has {gemms()})")
    with forced_isa("avx512_bf16"), forced_gemm(gemm):
        for M, N, K in [(2, 17, 64), (5, 47, 1030), (16, 64, 1024), (17, 33, 96), (33, 100, 2), (32, 1, 34),
                        (1, 9, 64)]:
            x, w, b = rand(M, K, dtype=torch.bfloat16, seed=M), rand(N, K, dtype=torch.bfloat16, seed=N), rand(N)
            for od in DTYPES:
                obuf = torch.full((M, N + 9), 5.0, dtype=od)
                ops.small_linear(x, w, b, out=obuf[:, 4:4 + N])
                check(obuf[:, 4:4 + N], x, w, b)
                assert (obuf[:, :4] == 5.0).all() and (obuf[:, 4 + N:] == 5.0).all()
        xs = rand(6, 200, dtype=torch.bfloat16)[:, 3:131]  # strided x rows
        w = rand(40, 128, dtype=torch.bfloat16, seed=9)
        check(ops.small_linear(xs, w), xs, w)


def test_matches_torch_matmul():
    """fp32: the same result as torch's F.linear within the accumulation-order bound of each."""
    for M, N, K in [(1, 1024, 4096), (4, 12352, 1024), (16, 64, 1024), (33, 5, 1031)]:
        x, w, b = rand(M, K), rand(N, K, seed=1), rand(N, seed=2)
        bound = x.abs() @ w.abs().T + b.abs()
        assert ((ops.small_linear(x, w, b) - F.linear(x, w, b)).abs() <= 4 * (K + 2) * 2.0**-24 * bound).all()


def test_degenerate_sizes():
    w = rand(5, 8)
    assert ops.small_linear(torch.empty(0, 8), w).shape == (0, 5)
    assert ops.small_linear(rand(3, 8), torch.empty(0, 8)).shape == (3, 0)
    # K = 0: the empty sum, plus the bias
    b = rand(5)
    torch.testing.assert_close(ops.small_linear(torch.empty(2, 0), torch.empty(5, 0), b), b.expand(2, 5))
    torch.testing.assert_close(ops.linear(torch.empty(2, 0), torch.empty(5, 0)), torch.zeros(2, 5))


@pytest.fixture
def max_m():
    """Sets VLLM_GDN_CPU_LINEAR_MAX_M within a test (restored after)."""
    saved = os.environ.get(ops.LINEAR_MAX_M_ENV)

    def set_(value):
        os.environ[ops.LINEAR_MAX_M_ENV] = str(value)

    yield set_
    if saved is None:
        os.environ.pop(ops.LINEAR_MAX_M_ENV, None)
    else:
        os.environ[ops.LINEAR_MAX_M_ENV] = saved


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_dispatch_threshold_and_counts(max_m, dtype):
    """M <= VLLM_GDN_CPU_LINEAR_MAX_M runs ours, above it torch's GEMM; both give x's dtype and
    the right values; the counters record each call's path."""
    w, b = rand(40, 96, dtype=dtype, seed=1), rand(40, dtype=dtype, seed=2)
    max_m(4)
    ops.reset_linear_path_counts()
    for M in (1, 4, 5, 64):
        x = rand(M, 96, dtype=dtype, seed=M)
        out = ops.linear(x, w, b)
        assert out.dtype == dtype and out.shape == (M, 40)
        if M <= 4:
            check(out, x, w, b)
            torch.testing.assert_close(out, ops.small_linear(x, w, b), rtol=0, atol=0)
        else:  # torch's GEMM, bit for bit
            torch.testing.assert_close(out, F.linear(x, w, b), rtol=0, atol=0)
    assert ops.linear_path_counts() == {"small": 2, "large": 2}
    max_m(0)
    ops.linear(rand(1, 96, dtype=dtype), w)
    assert ops.linear_path_counts() == {"small": 2, "large": 3}
    ops.reset_linear_path_counts()
    assert ops.linear_path_counts() == {"small": 0, "large": 0}


def test_dispatch_default_threshold_takes_decode(max_m):
    os.environ.pop(ops.LINEAR_MAX_M_ENV, None)
    ops.reset_linear_path_counts()
    w = rand(64, 256)
    ops.linear(rand(1, 256), w)
    ops.linear(rand(4096, 256), w)
    assert ops.linear_path_counts() == {"small": 1, "large": 1}


def test_dispatch_mixed_dtypes_large_path(max_m):
    """Above the threshold with x and weight of different dtypes: x in the weight's dtype through
    torch's GEMM, the result in x's dtype."""
    max_m(0)
    x, w, b = rand(8, 64), rand(16, 64, dtype=torch.bfloat16, seed=1), rand(16, seed=2)
    out = ops.linear(x, w, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x.bfloat16(), w, b.bfloat16()).float(), rtol=0, atol=0)
    max_m(8)
    check(ops.linear(x, w, b), x, w, b)  # ours: x stays fp32


@pytest.mark.error_path
def test_bad_threshold_variable(max_m):
    for bad in ("-1", "abc", "4x"):
        max_m(bad)
        with pytest.raises(ValueError, match="VLLM_GDN_CPU_LINEAR_MAX_M"):
            ops.linear(rand(1, 8), rand(2, 8))


ERROR_CASES = [
    ("x 1-D", lambda x, w, b, o: dict(x=x[0]), ValueError, "'x' must be 2-D"),
    ("x int", lambda x, w, b, o: dict(x=x.int()), TypeError, "'x' must be float32"),
    ("x stride", lambda x, w, b, o: dict(x=x.t().contiguous().t()), ValueError, "'x' must be contiguous in its last"),
    ("w 3-D", lambda x, w, b, o: dict(weight=w[None]), ValueError, "'weight' must be 2-D"),
    ("w dtype", lambda x, w, b, o: dict(weight=w.double()), TypeError, "'weight' must be float32"),
    ("w K", lambda x, w, b, o: dict(weight=w[:, :7]), ValueError, "'weight' must be contiguous"),
    ("w K contiguous", lambda x, w, b, o: dict(weight=w[:, :7].contiguous()), ValueError, "'weight' must have K=8"),
    ("w transposed", lambda x, w, b, o: dict(weight=w.t().contiguous().t()), ValueError,
     "'weight' must be contiguous"),
    ("bias len", lambda x, w, b, o: dict(bias=b[:3]), ValueError, "'bias' must have N=5"),
    ("bias 2-D", lambda x, w, b, o: dict(bias=b[None]), ValueError, "'bias' must be 1-D"),
    ("bias dtype", lambda x, w, b, o: dict(bias=b.double()), TypeError, "'bias' must be float32"),
    ("out shape", lambda x, w, b, o: dict(out=o[:, :4]), ValueError, "'out' must have shape"),
    ("out dtype", lambda x, w, b, o: dict(out=o.double()), TypeError, "'out' must be float32"),
    ("out stride", lambda x, w, b, o: dict(out=o.t().contiguous().t()), ValueError,
     "'out' must be contiguous in its last"),
    ("out expanded", lambda x, w, b, o: dict(out=o[:1].expand(3, 5)), ValueError, "overlapping elements"),
    ("out aliases x", lambda x, w, b, o: dict(x=torch.zeros(3, 8), out=None), None, None),
]


@pytest.mark.error_path
@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_name_the_argument_and_write_nothing(case):
    _, make, exc, msg = case
    x, w, b = rand(3, 8), rand(5, 8, seed=1), rand(5, seed=2)
    o = torch.full((3, 5), 3.0)
    args = dict(x=x, weight=w, bias=b, out=o)
    overrides = make(x, w, b, o)
    args.update(overrides)
    if exc is None:  # out overlapping x: built here, where x can be a view of out's buffer
        buf = torch.zeros(3, 8)
        with pytest.raises(ValueError, match="'out' must not overlap argument 'x'"):
            ops.small_linear(buf, rand(8, 8), out=buf)
        return
    target = args["out"]
    before = target.clone() if target.device.type == "cpu" else None
    with pytest.raises(exc, match=msg):
        ops.small_linear(args["x"], args["weight"], args["bias"], out=target)
    if "out" not in overrides:  # the dispatcher checks the same arguments
        with pytest.raises(exc, match=msg):
            ops.linear(args["x"], args["weight"], args["bias"])
    if before is not None:
        assert torch.equal(target, before)
