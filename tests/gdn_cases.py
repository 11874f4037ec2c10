"""Input builders and tolerances shared by the kernel tests (no vLLM needed)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vllm_gdn_cpu import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

# Output tolerances, relative to the largest |reference output|. The kernel and the float64
# reference read the same rounded inputs, so the gap is fp32 arithmetic plus one final rounding of
# the output to its dtype: 2^-8 for bf16, 2^-11 for fp16, with a 2x margin. For fp32 outputs the
# arithmetic is all of it: ~1e-6 relative per product, amplified in the chunked prefill by the
# per-chunk triangular solve when keys are nearly parallel (worst seen over the property examples:
# 2.6e-5), so 5e-5.
OUT_RTOL = {torch.float32: 5e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Final states are rounded once to the state dtype (relative to the largest |state| entry).
STATE_RTOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# On GEMM paths with bf16 products (avx512_bf16, amx), bf16 inputs run the chunk's matrix products
# on bf16-rounded operands with fp32 accumulation (as FLA's GPU kernels do): each product carries
# ~2^-9 relative rounding per operand, a few of them chained per chunk; measured ~5e-3.
BF16_PRODUCTS_RTOL = 1.5e-2


def prefill_rtols(dtype: torch.dtype, state_dtype: torch.dtype) -> tuple[float, float]:
    """(output, state) tolerances of the prefill for the GEMM path in use."""
    out_rtol, state_rtol = OUT_RTOL[dtype], STATE_RTOL[state_dtype]
    if bf16_products_in_use(dtype):
        out_rtol, state_rtol = max(out_rtol, BF16_PRODUCTS_RTOL), max(state_rtol, BF16_PRODUCTS_RTOL)
    return out_rtol, state_rtol


def gemms() -> list[str]:
    return ops.runtime_info()["available_gemms"]


def forced_gemm(gemm: str):
    """Forces VLLM_GDN_CPU_GEMM within a with-block (and checks that it took effect)."""
    return _forced_env(ops.GEMM_ENV, gemm, lambda: ops.runtime_info()["gemm"].removesuffix("-fp32") == gemm)


@contextmanager
def torch_threads(n: int):
    """Runs a with-block on n torch threads. Through torch._C: once an in-process vLLM engine has
    run (the e2e tests), vLLM's CPU worker has replaced torch.set_num_threads with a no-op."""
    saved = torch.get_num_threads()
    torch._C.set_num_threads(n)
    try:
        assert torch.get_num_threads() == n
        yield
    finally:
        torch._C.set_num_threads(saved)


def isas() -> list[str]:
    return ops.runtime_info()["available_isas"]


def forced_isa(isa: str):
    """Forces VLLM_GDN_CPU_ISA within a with-block (and checks that it took effect)."""
    return _forced_env(ops.ISA_ENV, isa, lambda: ops.runtime_info()["isa"] == isa)


@contextmanager
def _forced_env(name: str, value: str, took_effect):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        assert took_effect(), f"{name}={value} did not take effect: {ops.runtime_info()}"
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def vllm_bf16_gemm_unusable() -> str | None:
    """Why vLLM's own bf16 CPU GEMMs cannot run in this process (None: they can). ci/test.sh's
    emulated AVX2 pass caps oneDNN and ATen (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY) while vLLM
    picks its bf16 kernels (sgl-kernel AMX/AVX-512, oneDNN AMX) from the real CPU's flags: they abort
    the process there. A real AVX2 CPU gives vLLM other kernels."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        return ("ONEDNN_MAX_CPU_ISA caps oneDNN (emulated AVX2 pass) while vLLM picks its bf16 GEMM "
                "kernels from the real CPU's flags: they abort")
    return None


def bf16_products_in_use(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and not ops.runtime_info()["gemm"].endswith("-fp32")


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str,
                     floor: float = 1e-3) -> None:
    """max |actual - expected| <= rtol * max(max |expected|, floor)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * max(scale, floor), f"{what}: max abs err {err:.3e} > {rtol:.1e} x {scale:.3e}"


@dataclass
class Problem:
    """One varlen batch of GDN inputs, with per-head distinct gates."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    A_log: torch.Tensor
    dt_bias: torch.Tensor
    state: torch.Tensor
    state_indices: torch.Tensor
    cu_seqlens: torch.Tensor

    def gates(self, **kw):
        return ops.gdn_gating(self.A_log, self.a, self.b, self.dt_bias, **kw)


def make_problem(
    seqlens: list[int],
    Hk: int,
    Hv: int,
    K: int,
    V: int,
    dtype: torch.dtype,
    state_dtype: torch.dtype,
    *,
    seed: int = 0,
    extra_slots: int = 3,
    strided: bool = False,
) -> Problem:
    """Random inputs; slots are scattered (sequence i uses slot 2*i+1 of a larger pool).

    With strided=True, q/k/v are views into one [T, Hk*K*2 + Hv*V + pad] buffer, like vLLM's
    split of the projected mixed_qkv.
    """
    gen = torch.Generator().manual_seed(seed)
    T, N = sum(seqlens), len(seqlens)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    if strided:
        width = 2 * Hk * K + Hv * V + 7
        mixed = randn(T, width).to(dtype)
        q = mixed[:, : Hk * K].view(T, Hk, K)
        k = mixed[:, Hk * K : 2 * Hk * K].view(T, Hk, K)
        v = mixed[:, 2 * Hk * K : 2 * Hk * K + Hv * V].view(T, Hv, V)
    else:
        q, k, v = randn(T, Hk, K).to(dtype), randn(T, Hk, K).to(dtype), randn(T, Hv, V).to(dtype)
    # Per-head offsets make every head's g and beta different, so a head-index bug cannot pass.
    head = torch.arange(Hv, dtype=torch.float32)
    a = (randn(T, Hv) + 0.3 * head - 1.0).to(dtype)
    b = (randn(T, Hv) - 0.2 * head + 0.5).to(dtype)
    A_log = torch.linspace(-1.5, 0.5, Hv)
    dt_bias = torch.linspace(-0.5, 0.5, Hv)
    num_slots = 2 * N + extra_slots
    state = (0.3 * randn(num_slots, Hv, K, V)).to(state_dtype)
    state_indices = (2 * torch.arange(N) + 1).to(torch.int32)
    cu = torch.zeros(N + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
    return Problem(q, k, v, a, b, A_log, dt_bias, state, state_indices, cu)
