"""stream_scale_, the benchmarks' bandwidth probe: it must really scale every element in place (a
probe that skipped work would report impossible bandwidth), on every ISA, and reject what it
cannot stream."""

import pytest
import torch

from gdn_cases import forced_isa, isas
from vllm_gdn_cpu import ops


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("n", [1, 15, 16, 16384 * 3 + 7])  # below, at and past vector and task sizes
def test_scales_every_element_in_place(isa, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    expected = x * 0.75
    data_ptr = x.data_ptr()
    with forced_isa(isa):
        assert ops.stream_scale_(x, 0.75) is x
    assert x.data_ptr() == data_ptr
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


@pytest.mark.error_path
@pytest.mark.parametrize("bad, message", [
    (torch.ones(8, dtype=torch.float64), "'x' must be float32"),
    (torch.ones(8, 2)[:, 0], "'x' must be contiguous"),
])
def test_rejects(bad, message):
    with pytest.raises(ValueError, match=message):
        ops.stream_scale_(bad, 2.0)
