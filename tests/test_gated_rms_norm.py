"""Gated RMSNorm (ops.gated_rms_norm) vs a float64 reference and vLLM's RMSNormGated.forward_native,
on every ISA path, dtypes, odd widths, strided and non-collapsible layouts, in place.

Tolerance (relative to each |ref| element): fp32 math over D squares (at most D u relative, u =
2^-24), rsqrt, the gate's exp (~1 ulp, Cephes) and a few products: (D + 16) u with a factor 2 margin,
then one rounding to the output dtype (half an ulp: 2^-9 bf16, 2^-12 fp16; we allow one ulp), plus
1e-6 of the largest |ref| for elements whose gate underflows."""

from __future__ import annotations

import pytest
import torch

from gdn_cases import DTYPE_IDS, DTYPES, forced_isa, isas, torch_threads
from vllm_gdn_cpu import ops, reference

ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def check(out, x, z, w, eps, activation):
    ref = reference.gated_rms_norm_ref(x, z, w, eps, activation, compute_dtype=torch.float64).double()
    # the reference rounds to x's dtype; compare against the unrounded value
    xf, zf, wf = x.double(), z.double(), w.double()
    exact = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * wf
    exact = exact * (torch.sigmoid(zf) if activation == "sigmoid" else torch.nn.functional.silu(zf))
    D = x.shape[-1]
    tol = (2 * (D + 16) * 2.0**-24 + ULP[out.dtype]) * exact.abs() + 1e-6 * exact.abs().max() + 1e-30
    err = (out.double() - exact).abs()
    assert torch.isfinite(out).all()
    assert (err <= tol).all(), f"max err {err.max().item():.3g}, ref rounded max diff {(ref - exact).abs().max()}"


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("activation", ["silu", "sigmoid", "swish"])
def test_matches_float64_reference(isa, dtype, activation):
    with forced_isa(isa):
        for D in (1, 3, 7, 16, 17, 64, 128, 130, 1000):
            x, z = rand(5, D, dtype=dtype, seed=D, scale=3.0), rand(5, D, dtype=dtype, seed=D + 1, scale=2.0)
            w = rand(D, seed=D + 2) + 1.0
            out = ops.gated_rms_norm(x, z, w, 1e-6, activation=activation)
            assert out.dtype == dtype and out.shape == x.shape
            check(out, x, z, w, 1e-6, activation)


@pytest.mark.parametrize("threads", [1, 2])
def test_leading_shapes_strides_and_weight_dtypes(threads):
    """x [T, H, D] contiguous, z a slice of a wider projection output, weight bf16; a layout whose
    leading dims need three levels (copied); out strided; in place over x."""
    with torch_threads(threads):
        T, H, D = 37, 4, 128
        proj = rand(T, H, 3 * D, dtype=torch.bfloat16, seed=1)
        x, z = rand(T, H, D, dtype=torch.bfloat16, seed=2), proj[:, :, D:2 * D]
        w = (rand(D, seed=3) + 1).bfloat16()
        check(ops.gated_rms_norm(x, z, w, 1e-5), x, z, w, 1e-5, "silu")
        big = rand(2, 5, 9, D, seed=4)
        x3 = big[:, :3, ::2]  # sizes [2, 3, 5, D], strides that merge into no fewer than three levels
        z3 = rand(2, 5, 9, D, seed=5)[:, :3, ::2]
        obuf = torch.full((2, 5, 9, D), 9.0)
        out3 = obuf[:, :3, ::2]
        ops.gated_rms_norm(x3, z3, w.float(), 1e-5, activation="sigmoid", out=out3)
        check(out3, x3, z3, w.float(), 1e-5, "sigmoid")
        untouched = torch.ones_like(obuf, dtype=torch.bool)
        untouched[:, :3, ::2] = False
        assert (obuf[untouched] == 9.0).all()
        xi = x.clone()
        ops.gated_rms_norm(xi, z, w, 1e-5, out=xi)
        check(xi, x, z, w, 1e-5, "silu")
        # 1-D and empty inputs
        check(ops.gated_rms_norm(x[0, 0], z[0, 0], w, 1e-5), x[0, 0], z[0, 0], w, 1e-5, "silu")
        assert ops.gated_rms_norm(x[:0], z[:0], w, 1e-5).shape == (0, H, D)


@pytest.mark.vllm
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("activation", ["swish", "sigmoid"])
def test_matches_vllm_forward_native(dtype, activation):
    pytest.importorskip("vllm", reason="vLLM's RMSNormGated is the reference here")
    from vllm.model_executor.layers.layernorm import RMSNormGated

    D = 128
    try:
        norm = RMSNormGated(D, eps=1e-6, norm_before_gate=True, dtype=dtype, activation=activation)
    except Exception:  # noqa: BLE001 - CustomOp construction outside an engine may need a config
        from vllm.config import VllmConfig, set_current_vllm_config

        with set_current_vllm_config(VllmConfig()):
            norm = RMSNormGated(D, eps=1e-6, norm_before_gate=True, dtype=dtype, activation=activation)
    with torch.no_grad():
        norm.weight.copy_(rand(D, seed=7) + 1)
    x, z = rand(6, 2, D, dtype=dtype, seed=8, scale=2), rand(6, 2, D, dtype=dtype, seed=9, scale=2)
    expected = norm.forward_native(x, z)
    out = ops.gated_rms_norm(x, z, norm.weight, norm.eps, activation=norm.activation)
    # Both compute in fp32 and round once: at most one ulp of the output dtype apart (two
    # roundings of nearly equal fp32 values), fp32 a few ulps.
    torch.testing.assert_close(out, expected, rtol=ULP[dtype] if dtype != torch.float32 else 1e-5, atol=1e-6)


BAD = [
    ("z shape", lambda x, z, w, o: dict(z=z[:, :3]), ValueError, "'z' must have shape"),
    ("z dtype", lambda x, z, w, o: dict(z=z.bfloat16()), TypeError, "'z' must have x's dtype"),
    ("out dtype", lambda x, z, w, o: dict(out=o[:, :8].half()), TypeError, "'out' must have x's dtype"),
    ("out shape", lambda x, z, w, o: dict(out=o[:2, :8]), ValueError, "'out' must have shape"),
    ("weight len", lambda x, z, w, o: dict(weight=w[:5]), ValueError, "'weight' must have shape"),
    ("weight dtype", lambda x, z, w, o: dict(weight=w.double()), TypeError, "'weight' must be float32"),
    ("x dtype", lambda x, z, w, o: dict(x=x.double(), z=z.double(), out=o.double()), TypeError,
     "'x' must be float32"),
    ("x stride", lambda x, z, w, o: dict(x=x.t().contiguous().t()[:, :8]), ValueError,
     "'x' must be contiguous in its last dim"),
    ("eps", lambda x, z, w, o: dict(eps=-1.0), ValueError, "'eps' must be >= 0"),
    ("activation", lambda x, z, w, o: dict(activation="relu"), ValueError, "'activation' must be one of"),
    ("out partial overlap", lambda x, z, w, o: dict(x=o[:, :8], out=o[:, 8:]), ValueError,
     "'out' must not overlap argument 'x'"),
]


@pytest.mark.error_path
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_errors_name_the_argument(case):
    _, make, exc, msg = case
    x, z, w = rand(4, 8), rand(4, 8, seed=1), rand(8, seed=2)
    o = torch.full((4, 16), 5.0)
    args = dict(x=x, z=z, weight=w, eps=1e-6, activation="silu", out=o[:, :8].clone())
    args.update(make(x, z, w, o))
    target = args.pop("out")
    before = target.clone()
    with pytest.raises(exc, match=msg):
        ops.gated_rms_norm(args.pop("x"), args.pop("z"), args.pop("weight"), args.pop("eps"), out=target, **args)
    assert torch.equal(target, before)
