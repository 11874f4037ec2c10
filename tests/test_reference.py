"""The chunked algorithm (as written in torch in vllm_gdn_cpu.reference) is an exact rewrite of the
token recurrence: in float64 they agree to rounding. This pins down the math the C++ kernel uses."""

import pytest
import torch

from vllm_gdn_cpu.reference.gdn import _recurrence
from vllm_gdn_cpu.reference import chunk_gated_delta_rule_chunked_ref, gdn_gating_ref


@pytest.mark.parametrize("L", [1, 63, 64, 65, 150])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_form_equals_recurrence(L, chunk_size):
    gen = torch.Generator().manual_seed(L)
    H, K, V = 3, 16, 24
    q, k = torch.randn(L, H, K, generator=gen).double(), torch.randn(L, H, K, generator=gen).double()
    v = torch.randn(L, H, V, generator=gen).double()
    g, beta = gdn_gating_ref(torch.zeros(H), torch.randn(L, H, generator=gen), torch.randn(L, H, generator=gen),
                             torch.zeros(H), allow_neg_eigval=True, compute_dtype=torch.float64)
    S0 = torch.randn(H, K, V, generator=gen).double()
    S1, S2 = S0.clone(), S0.clone()
    o1 = _recurrence(q, k, v, g, beta, S1, 0.25, True)
    o2 = chunk_gated_delta_rule_chunked_ref(q, k, v, g, beta, S2, scale=0.25, chunk_size=chunk_size)
    torch.testing.assert_close(o2, o1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(S2, S1, rtol=1e-9, atol=1e-9)
