"""gdn_gating against the reference, for every input dtype and ISA."""

import pytest
import torch

from gdn_cases import DTYPE_IDS, DTYPES, forced_isa, isas
from vllm_gdn_cpu import ops
from vllm_gdn_cpu.reference import gdn_gating_ref


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("allow_neg_eigval", [False, True])
def test_gating(isa, dtype, param_dtype, allow_neg_eigval):
    gen = torch.Generator().manual_seed(0)
    T, Hv = 37, 6
    a = (torch.randn(T, Hv, generator=gen) * 8).to(dtype)  # crosses the softplus threshold
    b = torch.randn(T, Hv, generator=gen).to(dtype)
    A_log = torch.linspace(-2, 1, Hv).to(param_dtype)
    dt_bias = torch.linspace(-1, 1, Hv).to(param_dtype)
    with forced_isa(isa):
        g, beta = ops.gdn_gating(A_log, a, b, dt_bias, allow_neg_eigval=allow_neg_eigval)
    g_ref, beta_ref = gdn_gating_ref(A_log, a, b, dt_bias, allow_neg_eigval=allow_neg_eigval,
                                     compute_dtype=torch.float64)
    assert g.dtype == beta.dtype == torch.float32 and g.shape == (T, Hv)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(beta.double(), beta_ref, rtol=1e-5, atol=1e-6)


def test_gating_softplus_params_and_strided_inputs():
    gen = torch.Generator().manual_seed(1)
    ab = torch.randn(11, 2, 5, generator=gen)
    a, b = ab[:, 0], ab[:, 1]  # row stride 10
    A_log, dt_bias = torch.rand(5, generator=gen), torch.rand(5, generator=gen)
    g, beta = ops.gdn_gating(A_log, a, b, dt_bias, softplus_beta=3.0, softplus_threshold=2.0)
    g_ref, beta_ref = gdn_gating_ref(A_log, a, b, dt_bias, softplus_beta=3.0, softplus_threshold=2.0,
                                     compute_dtype=torch.float64)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(beta.double(), beta_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("softplus_beta", [1.0, 0.5, 3.0])
def test_gating_accuracy_over_wide_range(isa, softplus_beta):
    """The vectorised softplus/sigmoid/exp stay within a few fp32 ulps of float64 down to values of
    ~1e-26 (relative, not absolute, error: |softplus_beta * a| <= 60 and |b| <= 60), with more heads
    than one vector round of the kernel (70 > 64) and a ragged last vector."""
    T, Hv = 64, 70
    reach = 60 / max(softplus_beta, 1.0)
    a = torch.linspace(-reach, reach, T * Hv).reshape(T, Hv)
    b = torch.linspace(60, -60, T * Hv).reshape(T, Hv)
    A_log = torch.linspace(-3, 2, Hv)
    dt_bias = torch.linspace(-0.5, 0.5, Hv)
    with forced_isa(isa):
        g, beta = ops.gdn_gating(A_log, a, b, dt_bias, softplus_beta=softplus_beta)
    g_ref, beta_ref = gdn_gating_ref(A_log, a, b, dt_bias, softplus_beta=softplus_beta,
                                     compute_dtype=torch.float64)
    # exp(x) amplifies the fp32 rounding of x (|x| <= 60: up to 60 * 6e-8 = 3.6e-6 relative), on top
    # of a few ulps of the polynomial approximations.
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(beta.double(), beta_ref, rtol=1e-5, atol=0.0)
