"""Input builders and tolerances of the Mamba-1 selective-scan kernel tests (no vLLM needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from gdn_cases import OUT_RTOL, STATE_RTOL, assert_close_rel
from vllm_gdn_cpu import ops
from vllm_gdn_cpu.reference import selective_scan_ref, selective_state_update_ref


@dataclass
class M1Problem:
    x: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: Optional[torch.Tensor]
    z: Optional[torch.Tensor]
    dt_bias: Optional[torch.Tensor]
    state: torch.Tensor
    state_indices: torch.Tensor
    cu_seqlens: torch.Tensor
    kw: dict = field(default_factory=dict)  # has_initial_state, checkpoints, dt_softplus

    def args(self, state=None):
        return (self.x, self.dt, self.A, self.B, self.C, self.D, self.z, self.dt_bias,
                self.state if state is None else state, self.state_indices)


def make_m1(
    seqlens: list[int],
    Dm: int,
    N: int,
    dtype: torch.dtype,
    state_dtype: torch.dtype,
    *,
    seed: int = 0,
    with_D: bool = True,
    with_bias: bool = True,
    with_z: bool = True,
    bc_dtype: Optional[torch.dtype] = None,
    strided: bool = False,
    extra_slots: int = 3,
) -> M1Problem:
    """Random inputs with per-channel distinct A (S4D-real-like spread: -(n+1) scaled per channel),
    D and dt_bias; sequence i uses slot 2*i+1 of a larger pool. strided=True: x, z, dt, B, C are
    column views of one [T, width] buffer (vLLM splits its projections so), token strides > sizes."""
    gen = torch.Generator().manual_seed(seed)
    T, Nseq = sum(seqlens), len(seqlens)
    bc_dtype = bc_dtype or dtype

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    chan = torch.arange(Dm, dtype=torch.float32)
    dt_raw = randn(T, Dm) + 0.5 * torch.sin(chan) - 1.5
    if strided:
        buf = randn(T, 3 * Dm + 7).to(dtype)
        x, z = buf[:, :Dm], buf[:, Dm : 2 * Dm] if with_z else None
        dtb = buf[:, 2 * Dm : 3 * Dm]
        dtb.copy_(dt_raw)
        dt = dtb
        bc = randn(T, 2 * N + 3).to(bc_dtype)
        B, C = bc[:, :N], bc[:, N : 2 * N]
    else:
        x, z = randn(T, Dm).to(dtype), randn(T, Dm).to(dtype) if with_z else None
        dt = dt_raw.to(dtype)
        B, C = randn(T, N).to(bc_dtype), randn(T, N).to(bc_dtype)
    A = -(torch.arange(1, N + 1, dtype=torch.float32)[None, :] * torch.exp(0.5 * randn(Dm, 1)))
    D = torch.linspace(0.5, 1.5, Dm) if with_D else None
    dt_bias = 0.3 * randn(Dm) if with_bias else None
    num_slots = 2 * Nseq + extra_slots
    state = (0.5 * randn(num_slots, Dm, N)).to(state_dtype)
    idx = (2 * torch.arange(Nseq) + 1).to(torch.int32)
    cu = torch.zeros(Nseq + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
    return M1Problem(x, dt, A, B, C, D, z, dt_bias, state, idx, cu)


def rtols(dtype: torch.dtype, state_dtype: torch.dtype) -> tuple[float, float]:
    """(output, state) tolerances relative to the largest |reference| entry: ours and the float64
    reference read the same rounded inputs, so the gap is fp32 arithmetic (vexp ~1 ulp, a sum of N
    products per output, a recurrence that forgets: no growth with T) plus one rounding of the
    output / state to its dtype (gdn_cases.OUT_RTOL / STATE_RTOL). The state is rounded to its dtype
    only when stored, so a narrow state adds no error along the sequence."""
    return OUT_RTOL[dtype], STATE_RTOL[state_dtype]


def prefill_and_compare(p: M1Problem, *, label: str = "", **over):
    """Runs ours and the float64 reference on copies of the state; checks output and every slot.
    Returns (ours_state, ours_out)."""
    kw = {**p.kw, **over}
    state_ref = p.state.double()
    expected = selective_scan_ref(*p.args(state_ref), p.cu_seqlens, compute_dtype=torch.float64, **kw)
    state = p.state.clone()
    out = ops.selective_scan(*p.args(state), p.cu_seqlens, **kw)
    assert out.dtype == p.x.dtype and out.shape == p.x.shape
    out_rtol, state_rtol = rtols(p.x.dtype, p.state.dtype)
    assert_close_rel(out, expected, out_rtol, f"{label} output")
    assert_close_rel(state, state_ref, state_rtol, f"{label} states (all slots)")
    return state, out


def decode_and_compare(p: M1Problem, *, label: str = "", **over):
    kw = {**p.kw, **over}
    state_ref = p.state.double()
    expected = selective_state_update_ref(*p.args(state_ref), compute_dtype=torch.float64, **kw)
    state = p.state.clone()
    out = ops.selective_state_update(*p.args(state), **kw)
    assert out.dtype == p.x.dtype and out.shape == p.x.shape
    out_rtol, state_rtol = rtols(p.x.dtype, p.state.dtype)
    assert_close_rel(out, expected, out_rtol, f"{label} output")
    assert_close_rel(state, state_ref, state_rtol, f"{label} states (all slots)")
    return state, out
