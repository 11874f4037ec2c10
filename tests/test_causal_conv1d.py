"""causal_conv1d against its float64 reference (vllm_gdn_cpu.reference.causal_conv1d_ref)."""

import pytest
import torch

from gdn_cases import DTYPE_IDS, DTYPES, OUT_RTOL, assert_close_rel, forced_isa, isas
from vllm_gdn_cpu import ops
from vllm_gdn_cpu.reference import causal_conv1d_ref


def make_conv(lengths, D, W, dtype, state_dtype, *, seed=0, dim_first=False, with_bias=True, strided_x=False):
    gen = torch.Generator().manual_seed(seed)
    T, N = sum(lengths), len(lengths)
    x = torch.randn(T, D + (9 if strided_x else 0), generator=gen).to(dtype)[:, :D]
    weight = torch.randn(D, W, generator=gen) * 0.5
    bias = torch.randn(D, generator=gen) if with_bias else None
    num_slots = 2 * N + 2
    state = torch.randn(num_slots, W - 1, D, generator=gen).to(state_dtype)
    if dim_first:
        state = state.transpose(1, 2).contiguous().transpose(1, 2)
    slots = (2 * torch.arange(N) + 1).to(torch.int32)
    cu = torch.zeros(N + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return x, weight, bias, state, slots, cu


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("W", [2, 4, 8])
@pytest.mark.parametrize("dim_first", [False, True], ids=["tap_major", "dim_major"])
def test_conv_all_isas_widths_layouts(isa, W, dim_first):
    lengths = [1, 5, 70, 2, 0, 1]
    x, weight, bias, state, slots, cu = make_conv(lengths, 300, W, torch.float32, torch.float32,
                                                  dim_first=dim_first, strided_x=True)
    slots[3] = -1  # padding: history zero, state untouched
    has_init = torch.tensor([True, False, True, True, True, True])
    ref_state = state.double()
    expected = causal_conv1d_ref(x, weight, bias, ref_state, slots, cu, has_init, True, compute_dtype=torch.float64)
    got_state = state.clone()
    with forced_isa(isa):
        out = ops.causal_conv1d(x, weight, bias, got_state, slots, cu, has_initial_state=has_init)
    assert_close_rel(out, expected, 1e-5, "conv output")
    assert_close_rel(got_state, ref_state, 1e-6, "conv state")
    untouched = [s for s in range(state.shape[0]) if s not in slots.tolist()]
    assert torch.equal(got_state[untouched], state[untouched])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("state_dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("silu", [True, False])
def test_conv_dtypes(dtype, state_dtype, silu):
    x, weight, bias, state, slots, cu = make_conv([3, 1, 40], 96, 4, dtype, state_dtype, seed=1)
    ref_state = state.double()
    expected = causal_conv1d_ref(x, weight, bias, ref_state, slots, cu, None, silu, compute_dtype=torch.float64)
    got_state = state.clone()
    out = ops.causal_conv1d(x, weight, bias, got_state, slots, cu, silu=silu)
    assert out.dtype == dtype
    assert_close_rel(out, expected, OUT_RTOL[dtype], "conv output")
    # the state holds past inputs: copied, so exact up to the state dtype's rounding of x
    assert torch.equal(got_state, ref_state.to(state_dtype))


def test_conv_decode_is_length_one_sequences():
    """Decode steps one token at a time reproduce a prefill of the same tokens."""
    x, weight, bias, state, slots, cu = make_conv([12], 64, 4, torch.float32, torch.float32, seed=2)
    s_prefill, s_decode = state.clone(), state.clone()
    full = ops.causal_conv1d(x, weight, bias, s_prefill, slots, cu)
    steps = [ops.causal_conv1d(x[t : t + 1], weight, bias, s_decode, slots, torch.tensor([0, 1], dtype=torch.int32))
             for t in range(12)]
    assert_close_rel(torch.cat(steps), full, 1e-6, "decode vs prefill")
    assert torch.equal(s_decode, s_prefill)


@pytest.mark.error_path
def test_conv_rejects_bad_arguments():
    x, weight, bias, state, slots, cu = make_conv([3], 16, 4, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="'weight' must have shape"):
        ops.causal_conv1d(x, torch.zeros(16, 9), bias, state, slots, cu)
    with pytest.raises(ValueError, match="'conv_state' must have shape"):
        ops.causal_conv1d(x, weight, bias, state[:, :2], slots, cu)
    with pytest.raises(IndexError, match="'state_indices'"):
        ops.causal_conv1d(x, weight, bias, state, torch.tensor([99], dtype=torch.int32), cu)


def test_opcheck_causal_conv1d():
    x, weight, bias, state, slots, cu = make_conv([3, 4], 32, 4, torch.bfloat16, torch.float32)
    torch.library.opcheck(torch.ops.vllm_gdn_cpu.causal_conv1d.default,
                          (x, weight, bias, state, slots, cu, None, True, torch.empty_like(x)))
