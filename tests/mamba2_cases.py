"""Input builders and tolerances of the Mamba2 (SSD) kernel tests (no vLLM needed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from gdn_cases import BF16_PRODUCTS_RTOL, OUT_RTOL, STATE_RTOL, assert_close_rel, bf16_products_in_use
from vllm_gdn_cpu import ops
from vllm_gdn_cpu.reference import mamba2_chunk_scan_ref, mamba2_state_update_ref


@dataclass
class M2Problem:
    x: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: Optional[torch.Tensor]
    dt_bias: Optional[torch.Tensor]
    z: Optional[torch.Tensor]
    state: torch.Tensor
    state_indices: torch.Tensor
    cu_seqlens: torch.Tensor
    kw: dict = field(default_factory=dict)  # has_initial_state, checkpoints, dt_softplus, dt_limit

    def args(self, state=None):
        return (self.x, self.dt, self.A, self.B, self.C, self.D, self.dt_bias,
                self.state if state is None else state, self.state_indices)


def make_m2(
    seqlens: list[int],
    H: int,
    P: int,
    G: int,
    N: int,
    dtype: torch.dtype,
    state_dtype: torch.dtype,
    *,
    seed: int = 0,
    with_D: bool = True,
    with_bias: bool = True,
    with_z: bool = False,
    strided: bool = False,
    extra_slots: int = 3,
) -> M2Problem:
    """Random inputs with per-head distinct A/D/dt_bias; sequence i uses slot 2*i+1 of a larger pool.
    With strided=True, x, B, C (and z) are views into one [T, width] buffer, like vLLM's split of the
    projected xBC, so their token strides exceed their sizes."""
    gen = torch.Generator().manual_seed(seed)
    T, Nseq = sum(seqlens), len(seqlens)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    if strided:
        width = H * P + 2 * G * N + (H * P if with_z else 0) + 5
        buf = randn(T, width).to(dtype)
        x = buf[:, : H * P].view(T, H, P)
        B = buf[:, H * P : H * P + G * N].view(T, G, N)
        C = buf[:, H * P + G * N : H * P + 2 * G * N].view(T, G, N)
        z = buf[:, H * P + 2 * G * N : 2 * H * P + 2 * G * N].view(T, H, P) if with_z else None
    else:
        x, B, C = randn(T, H, P).to(dtype), randn(T, G, N).to(dtype), randn(T, G, N).to(dtype)
        z = randn(T, H, P).to(dtype) if with_z else None
    head = torch.arange(H, dtype=torch.float32)
    dt = (randn(T, H) + 0.2 * head - 1.5).to(dtype)
    A = -torch.exp(torch.linspace(-1.0, 1.0, H))
    D = torch.linspace(0.5, 1.5, H) if with_D else None
    dt_bias = torch.linspace(-0.5, 0.5, H) if with_bias else None
    num_slots = 2 * Nseq + extra_slots
    state = (0.5 * randn(num_slots, H, P, N)).to(state_dtype)
    idx = (2 * torch.arange(Nseq) + 1).to(torch.int32)
    cu = torch.zeros(Nseq + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
    return M2Problem(x, dt, A, B, C, D, dt_bias, z, state, idx, cu)


def rtols(dtype: torch.dtype, state_dtype: torch.dtype, prefill: bool = True) -> tuple[float, float]:
    """(output, state) tolerances relative to the largest |reference| entry: the kernel and the
    float64 reference read the same rounded inputs, so the gap is fp32 arithmetic (~1e-6 relative;
    a chunk sums at most 64 products per entry) plus one rounding of the output / state to its
    dtype; on GEMM paths with bf16 products the prefill's operands (incl. the carried state) are
    rounded to bf16 (2^-9 relative each, a few chained: gdn_cases.BF16_PRODUCTS_RTOL)."""
    out_rtol, state_rtol = OUT_RTOL[dtype], STATE_RTOL[state_dtype]
    if prefill and bf16_products_in_use(dtype):
        out_rtol, state_rtol = max(out_rtol, BF16_PRODUCTS_RTOL), max(state_rtol, BF16_PRODUCTS_RTOL)
    return out_rtol, state_rtol


def prefill_and_compare(p: M2Problem, *, label: str = "", **over):
    """Runs ours and the float64 reference on copies of the state; checks output and every slot.
    Returns (ours_state, ours_out)."""
    kw = {**p.kw, **over}
    state_ref = p.state.double()
    expected = mamba2_chunk_scan_ref(*p.args(state_ref), p.cu_seqlens, z=p.z, compute_dtype=torch.float64, **kw)
    state = p.state.clone()
    out = ops.mamba2_chunk_scan(*p.args(state), p.cu_seqlens, z=p.z, **kw)
    assert out.dtype == p.x.dtype and out.shape == p.x.shape
    out_rtol, state_rtol = rtols(p.x.dtype, p.state.dtype)
    assert_close_rel(out, expected, out_rtol, f"{label} output")
    assert_close_rel(state, state_ref, state_rtol, f"{label} states (all slots)")
    return state, out


def decode_and_compare(p: M2Problem, *, label: str = "", **over):
    kw = {**p.kw, **over}
    state_ref = p.state.double()
    expected = mamba2_state_update_ref(*p.args(state_ref), z=p.z, compute_dtype=torch.float64, **kw)
    state = p.state.clone()
    out = ops.mamba2_state_update(*p.args(state), z=p.z, **kw)
    assert out.dtype == p.x.dtype and out.shape == p.x.shape
    out_rtol, state_rtol = rtols(p.x.dtype, p.state.dtype, prefill=False)
    assert_close_rel(out, expected, out_rtol, f"{label} output")
    assert_close_rel(state, state_ref, state_rtol, f"{label} states (all slots)")
    return state, out


INF = math.inf
