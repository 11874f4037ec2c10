"""torch.library.opcheck: schemas (incl. mutation annotations), fake impls, dispatch registration."""

import torch

from gdn_cases import make_problem


def test_opcheck_gdn_gating():
    p = make_problem([6], 1, 2, 16, 16, torch.float32, torch.float32)
    torch.library.opcheck(torch.ops.vllm_gdn_cpu.gdn_gating.default,
                          (p.A_log, p.a, p.b, p.dt_bias, 1.0, 20.0, False))


def test_opcheck_chunk_gated_delta_rule():
    p = make_problem([70, 5], 1, 2, 16, 16, torch.bfloat16, torch.float32)
    g, beta = p.gates()
    out = torch.empty_like(p.v)
    torch.library.opcheck(
        torch.ops.vllm_gdn_cpu.chunk_gated_delta_rule.default,
        (p.q, p.k, p.v, g, beta, p.state, p.state_indices, p.cu_seqlens, None, 0.25, True, out),
    )


def test_opcheck_fused_recurrent():
    p = make_problem([1, 1, 1], 1, 2, 16, 16, torch.float32, torch.bfloat16)
    out = torch.empty_like(p.v)
    torch.library.opcheck(
        torch.ops.vllm_gdn_cpu.fused_recurrent_gated_delta_rule.default,
        (p.q, p.k, p.v, p.A_log, p.dt_bias, p.a, p.b, p.state, p.state_indices, None, 0.25, True, False,
         1.0, 20.0, out),
    )


def test_opcheck_stream_scale():
    torch.library.opcheck(torch.ops.vllm_gdn_cpu.stream_scale.default, (torch.randn(1000), 0.5))


def test_opcheck_gemm_probe():
    # Its output is a timing, different on every run: only the schema and the fake impl (shape and
    # dtype of the result) can be checked, not eager-vs-compiled equality.
    torch.library.opcheck(torch.ops.vllm_gdn_cpu.gemm_probe.default, (True, 0.01),
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_mamba2_chunk_scan():
    from mamba2_cases import make_m2

    p = make_m2([70, 5], 4, 16, 2, 32, torch.bfloat16, torch.float32, with_z=True, extra_slots=4)
    torch.library.opcheck(
        torch.ops.vllm_gdn_cpu.mamba2_chunk_scan.default,
        (p.x, p.dt, p.A, p.B, p.C, p.D, p.dt_bias, p.state, p.state_indices, p.cu_seqlens,
         torch.tensor([True, False]), p.z, True, 0.0, float("inf"), torch.tensor([64, 5], dtype=torch.int32),
         torch.tensor([0, 2], dtype=torch.int32), torch.empty_like(p.x)),
    )


def test_opcheck_mamba2_state_update():
    from mamba2_cases import make_m2

    p = make_m2([1, 1, 1], 4, 16, 2, 32, torch.float32, torch.bfloat16)
    torch.library.opcheck(
        torch.ops.vllm_gdn_cpu.mamba2_state_update.default,
        (p.x, p.dt, p.A, p.B, p.C, p.D, p.dt_bias, p.state, p.state_indices, None, True, 0.0, float("inf"),
         torch.empty_like(p.x)),
    )


def test_opcheck_mamba1_selective_scan():
    from mamba1_cases import make_m1

    p = make_m1([70, 5], 37, 16, torch.bfloat16, torch.float32, extra_slots=4)
    torch.library.opcheck(
        torch.ops.vllm_gdn_cpu.mamba1_selective_scan.default,
        (p.x, p.dt, p.A, p.B, p.C, p.D, p.z, p.dt_bias, p.state, p.state_indices, p.cu_seqlens,
         torch.tensor([True, False]), True, torch.tensor([64, 5], dtype=torch.int32),
         torch.tensor([0, 2], dtype=torch.int32), torch.empty_like(p.x)),
    )


def test_opcheck_mamba1_state_update():
    from mamba1_cases import make_m1

    p = make_m1([1, 1, 1], 37, 16, torch.float32, torch.bfloat16, with_z=False)
    torch.library.opcheck(
        torch.ops.vllm_gdn_cpu.mamba1_state_update.default,
        (p.x, p.dt, p.A, p.B, p.C, p.D, None, p.dt_bias, p.state, p.state_indices, True, torch.empty_like(p.x)),
    )


def test_opcheck_small_linear():
    x, w, b = torch.randn(3, 40), torch.randn(7, 40).bfloat16(), torch.randn(7)
    torch.library.opcheck(torch.ops.vllm_gdn_cpu.small_linear.default, (x, w, b, torch.empty(3, 7)))
    torch.library.opcheck(torch.ops.vllm_gdn_cpu.small_linear.default, (x, w, None, torch.empty(3, 7).half()))


def test_opcheck_linear():
    # Both paths: M = 2 (ours under the default threshold) and M = 300 (torch's GEMM).
    w, b = torch.randn(9, 24), torch.randn(9)
    for M in (2, 300):
        torch.library.opcheck(torch.ops.vllm_gdn_cpu.linear.default, (torch.randn(M, 24), w, b))


def test_opcheck_linear_int8():
    q = torch.randint(-128, 128, (7, 24), dtype=torch.int8)
    scale, b = torch.rand(7), torch.randn(7)
    for M in (1, 3, 40):  # ours, and torch's GEMM on the dequantized weight above the threshold
        torch.library.opcheck(torch.ops.vllm_gdn_cpu.linear_int8.default, (torch.randn(M, 24), q, scale, b))
    torch.library.opcheck(torch.ops.vllm_gdn_cpu.linear_int8.default,
                          (torch.randn(2, 24).bfloat16(), q, scale.reshape(7, 1), None))


def test_opcheck_gated_rms_norm():
    x, z = torch.randn(3, 2, 32).bfloat16(), torch.randn(3, 2, 64).bfloat16()[..., 16:48]
    torch.library.opcheck(torch.ops.vllm_gdn_cpu.gated_rms_norm.default,
                          (x, z, torch.rand(32), 1e-6, False, torch.empty_like(x)))
