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
