"""int8 weight-only linear (ops.linear_int8: int8 weight [N, K] with one fp32 scale per row, float x)
vs the float64 dequantized reference (reference.linear_int8_ref), on every ISA path this machine can
force, odd sizes, the column-chunk edge, both kernel forms (one token tile: int8 converted in the
tile; several: each row chunk widened once to fp32) and the dispatch to torch's GEMM above the
token threshold.

Tolerance (a worst-case bound): the int8 values are exact in fp32; the kernel sums the K products
x_k q_k in fp32 in some order (at most 2 (K+2) u sum_k |x_k q_k|, u = 2^-24), multiplies the sum by
the scale (one more rounding: u |ref|) and adds the bias, then rounds once to out's dtype (half an ulp
of |ref|, with a factor 2 margin)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from gdn_cases import forced_isa, isas
from vllm_gdn_cpu import ops, reference

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ISAS = isas()
X_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def int8_weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    return q, scale


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check(out, x, q, scale, b=None):
    ref = reference.linear_int8_ref(x, q, scale, b, out_dtype=torch.float64)
    bound = (x.double().abs() @ q.double().abs().T) * scale.double().reshape(1, -1)
    if b is not None:
        bound = bound + b.double().abs()
    K = x.shape[1]
    tol = 2 * (K + 2) * 2.0**-24 * bound + (2 * UNIT_ROUNDOFF[out.dtype] + 2.0**-23) * ref.abs() + 6e-8
    err = (out.double() - ref).abs()
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    worst = (err - tol).argmax()
    assert (err <= tol).all(), (f"max excess at {divmod(worst.item(), ref.shape[1])}: err "
                                f"{err.flatten()[worst].item():.3g} > tol {tol.flatten()[worst].item():.3g}")


@pytest.fixture
def ours_always():
    """Our kernel for every token count (the dispatch threshold is tested below)."""
    saved = os.environ.get(ops.LINEAR_MAX_M_ENV)
    os.environ[ops.LINEAR_MAX_M_ENV] = "100000"
    yield
    if saved is None:
        os.environ.pop(ops.LINEAR_MAX_M_ENV, None)
    else:
        os.environ[ops.LINEAR_MAX_M_ENV] = saved


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("xdtype", X_DTYPES, ids=str)
def test_odd_sizes_every_isa(isa, xdtype, ours_always):
    """K = 1..67 (every vector tail), M = 1..20 and 33 (one tile and several: both kernel forms,
    token-tile tails), odd N (row-block tails), K across the 1024-column chunk."""
    with forced_isa(isa):
        for K in range(1, 68):
            x, (q, s) = rand(3, K, dtype=xdtype, seed=K), int8_weight(17, K, seed=K)
            check(ops.linear_int8(x, q, s), x, q, s)
        for M in list(range(1, 21)) + [33]:
            x, (q, s), b = rand(M, 131, dtype=xdtype, seed=M), int8_weight(13, 131, seed=M), rand(13, seed=M + 2)
            check(ops.linear_int8(x, q, s, b), x, q, s, b)
        for N in (1, 2, 3, 5, 17, 64, 257):
            for M in (1, 6):
                x, (q, s) = rand(M, 1007, dtype=xdtype, seed=N), int8_weight(N, 1007, seed=N)
                check(ops.linear_int8(x, q, s), x, q, s)
        for M in (1, 2, 9):
            x, (q, s) = rand(M, 2 * 1024 + 37, dtype=xdtype, seed=3), int8_weight(9, 2 * 1024 + 37, seed=3)
            check(ops.linear_int8(x, q, s.reshape(-1, 1)), x, q, s)  # [N, 1] scales as vLLM keeps them


def test_strided_x_rows_and_threads(ours_always):
    from gdn_cases import torch_threads

    q, s = int8_weight(300, 512, seed=5)
    wide = rand(7, 700)
    x = wide[:, 100:612]  # rows of stride 700
    for threads in (1, 2):
        with torch_threads(threads):
            check(ops.linear_int8(x, q, s), x, q, s)


def test_dispatch_threshold_and_counts():
    """M up to VLLM_GDN_CPU_LINEAR_MAX_M (default 32) on ours, above on torch's GEMM with the
    weight dequantized for the call; the path counters count both."""
    saved = os.environ.pop(ops.LINEAR_MAX_M_ENV, None)
    try:
        q, s = int8_weight(40, 96, seed=1)
        b = rand(40, seed=2)
        ops.reset_linear_path_counts()
        for M in (1, 32, 33, 200):
            x = rand(M, 96, seed=M)
            out = ops.linear_int8(x, q, s, b)
            if M <= 32:
                check(out, x, q, s, b)
            else:
                torch.testing.assert_close(out, F.linear(x, q.float() * s[:, None], b), rtol=0, atol=0)
        assert ops.linear_path_counts() == {"small": 2, "large": 2}
        os.environ[ops.LINEAR_MAX_M_ENV] = "0"
        ops.linear_int8(rand(1, 96), q, s)
        assert ops.linear_path_counts() == {"small": 2, "large": 3}
        x = rand(4, 96, dtype=torch.bfloat16)
        torch.testing.assert_close(ops.linear_int8(x, q, s), F.linear(x, (q.float() * s[:, None]).bfloat16()),
                                   rtol=0, atol=0)
    finally:
        ops.reset_linear_path_counts()
        if saved is None:
            os.environ.pop(ops.LINEAR_MAX_M_ENV, None)
        else:
            os.environ[ops.LINEAR_MAX_M_ENV] = saved


def test_degenerate_sizes(ours_always):
    q, s = int8_weight(5, 8)
    assert ops.linear_int8(rand(0, 8), q, s).shape == (0, 5)
    assert ops.linear_int8(rand(3, 8), q[:0], s[:0]).shape == (3, 0)
    x = rand(2, 0)
    assert torch.equal(ops.linear_int8(x, q[:, :0].contiguous(), s), torch.zeros(2, 5))


@pytest.mark.error_path
@pytest.mark.parametrize("case", [
    ("weight float", lambda x, q, s: (x, q.float(), s), TypeError, "'weight' must be int8"),
    ("weight strided", lambda x, q, s: (x, q.t(), s), ValueError, "'weight' must be contiguous"),
    ("K mismatch", lambda x, q, s: (x[:, :7], q, s), ValueError, "'weight' must have K=7"),
    ("scale count", lambda x, q, s: (x, q, s[:3]), ValueError, "'weight_scale' must be \\[N\\]"),
    ("scale dtype", lambda x, q, s: (x, q, s.double()), TypeError, "'weight_scale' must be float32"),
    ("x 1-D", lambda x, q, s: (x[0], q, s), ValueError, "'x' must be 2-D"),
], ids=lambda c: c[0])
def test_errors_name_the_argument(case):
    _, make, error, message = case
    x, (q, s) = rand(2, 8), int8_weight(4, 8)
    with pytest.raises(error, match=message):
        ops.linear_int8(*make(x, q, s))
