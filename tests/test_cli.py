"""The bench and info CLIs run and report what they promise (structure only: speed is never
asserted in tests)."""

import json
import os
import subprocess
import sys

import pytest

# What an AVX2-only x86 CPU (no AVX-512, no native bf16) runs, emulated on a newer one: our kernels
# capped at AVX2, torch's own kernels, oneDNN and MKL likewise.
AVX2_CPU_ENV = {"VLLM_GDN_CPU_MAX_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def run_cli(*args, timeout=600, env=None):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_info_json():
    info = run_cli("vllm_gdn_cpu.tools.info", "--json")
    assert info["kernel_isa"]["chosen"] in info["kernel_isa"]["available"]
    assert info["prefill_gemm"]["chosen"].removesuffix("-fp32") in info["prefill_gemm"]["available"]
    assert "torch" in info["prefill_gemm"]["available"] and info["threads"] >= 1


def test_bench_prefill_json_side_by_side():
    out = run_cli("vllm_gdn_cpu.tools.bench", "prefill", "--json", "--models", "qwen3.5-small", "--workloads", "16x128",
                  "--repeat", "1")
    (row,) = out["rows"]
    assert row["ours_tok_s"] > 0 and row["torch_ref_tok_s"] > 0 and row["speedup_vs_torch_ref"] > 0
    assert row["bf16_gemm_gflops"] > 0 and row["fp32_gemm_gflops"] > 0 and row["pct_of_path_gemm_peak"] > 0
    # The percentage is against the peak of the dtype the GEMM path multiplies in: torch's matmul in
    # that dtype or our engine on that path in cache, whichever is higher.
    assert row["engine_gflops"] > 0
    assert row["path_gemm_peak_gflops"] == max(row[f"{row['gemm_products']}_gemm_gflops"], row["engine_gflops"])
    pytest.importorskip("vllm", reason="vLLM's built-in kernel column needs vLLM")
    if os.environ.get("VLLM_GDN_CPU_MAX_ISA"):
        # An emulated older CPU: vLLM's kernel checks the real CPU (AMX) while oneDNN is capped
        # and may refuse; the bench then reports its error instead of a rate.
        assert row.get("vllm_tok_s", 0) > 0 or row["vllm_error"]
    else:
        assert row["vllm_tok_s"] > 0


def test_bench_probes_are_bounded_on_an_avx2_cpu():
    """On an AVX2-only CPU torch's bf16 matmul is emulated (a 2048^3 product took minutes on one):
    the bench's probes stay bounded, report the bf16 peak small rather than 0, and judge our fp32
    GEMM path against the fp32 peak."""
    out = run_cli("vllm_gdn_cpu.tools.bench", "prefill", "--json", "--models", "qwen3.5-small", "--workloads", "16x128",
                  "--repeat", "1", "--no-vllm", timeout=240, env=AVX2_CPU_ENV)
    (row,) = out["rows"]
    assert out["runtime"]["isa"] == "avx2" and "amx" not in out["runtime"]["available_gemms"]
    assert row["gemm_products"] == "fp32"
    assert row["path_gemm_peak_gflops"] == max(row["fp32_gemm_gflops"], row["engine_gflops"])
    assert row["bf16_gemm_gflops"] > 0 and row["ours_tok_s"] > 0


def test_bench_prefill_gemm_paths_side_by_side():
    out = run_cli("vllm_gdn_cpu.tools.bench", "prefill", "--json", "--models", "qwen3.5-small", "--workloads", "T512",
                  "--repeat", "1", "--no-ref", "--no-vllm", "--gemms", "torch,generic")
    (row,) = out["rows"]
    assert row["tok_s_torch"] > 0 and row["tok_s_generic"] > 0
    assert row["ours_tok_s"] == row["tok_s_torch"]
    assert row["torch_vs_generic"] == pytest.approx(row["tok_s_torch"] / row["tok_s_generic"])


def test_bench_decode_json_side_by_side():
    out = run_cli("vllm_gdn_cpu.tools.bench", "decode", "--json", "--batches", "2", "--layers", "2", "--repeat", "1",
                  "--state-dtypes", "float32,bfloat16")
    assert [r["state_dtype"] for r in out["rows"]] == ["float32", "bfloat16"]
    for row in out["rows"]:
        assert row["ours_gbps"] > 0 and row["stream_gbps"] > 0 and row["torch_ref_us_per_layer"] > 0


def test_bench_gemv_json_side_by_side():
    """Small shapes, one round: ours, torch's F.linear (and vLLM's onednn_mm where vLLM imports) over a
    cold weight pool, each against the stream probe of the same run, plus the one-thread CPU-time
    figures."""
    from vllm_gdn_cpu.tools.bench.harness import COLD_STATE_BYTES

    out = run_cli("vllm_gdn_cpu.tools.bench", "gemv", "--json", "--shapes", "512x1024", "--ms", "1,3",
                  "--weight-dtypes", "bfloat16", "--repeat", "1", "--cpu-time")
    assert [r["M"] for r in out["rows"]] == [1, 3]
    for row in out["rows"]:
        weight_bytes = 512 * 1024 * 2
        assert (row["pool_weights"] + 1) * weight_bytes >= COLD_STATE_BYTES  # cold: > 3x the LLC
        assert row["ours_gbps"] > 0 and row["torch_gbps"] > 0 and row["stream_gbps"] > 0
        assert row["ours_pct_of_stream"] == pytest.approx(100 * row["ours_gbps"] / row["stream_gbps"])
        assert row["speedup_vs_torch"] == pytest.approx(row["torch_us"] / row["ours_us"])
        assert row["ours_1t_cpu_gbps"] > 0 and row["stream_1t_cpu_gbps"] > 0
        if "vllm_us" in row:
            assert row["speedup_vs_vllm"] == pytest.approx(row["vllm_us"] / row["ours_us"])


@pytest.mark.slow  # ~30 s over 0.5 GB cold pools: once, not again in the AVX2 pass (the kernel's tests run in both)
def test_bench_gemv_int8_rows():
    """int8 weight rows: ours (ops.linear_int8) vs vLLM's W8A8 int8 GEMM (where vLLM imports) vs
    torch on a dequantized copy; GB/s of the int8 bytes and scales, % of the read bandwidth. int4
    rows: vLLM's W4A16 GEMM vs torch on a dequantized copy."""
    (int4,) = run_cli("vllm_gdn_cpu.tools.bench", "gemv", "--json", "--shapes", "512x1024", "--ms", "1",
                      "--weight-dtypes", "int4", "--repeat", "1")["rows"]
    assert int4["ours"] == "no int4 kernel" and int4["torch_dequantized_us"] > 0  # no int4 kernel of ours yet
    if "vllm_us" in int4:
        assert int4["vllm_gbps"] == pytest.approx((512 * 1024 // 2 + 512 * 8 * 2) / int4["vllm_us"] / 1e3)
    out = run_cli("vllm_gdn_cpu.tools.bench", "gemv", "--json", "--shapes", "512x1024", "--ms", "1,3",
                  "--weight-dtypes", "int8", "--repeat", "1", "--cpu-time")
    assert [r["M"] for r in out["rows"]] == [1, 3]
    for row in out["rows"]:
        assert row["weight_dtype"] == "int8" and row["x_dtype"] == "bfloat16"
        assert row["ours_gbps"] == pytest.approx((512 * 1024 + 512 * 4) / row["ours_us"] / 1e3)
        assert row["ours_pct_of_read"] == pytest.approx(100 * row["ours_gbps"] / row["read_gbps"])
        assert row["speedup_vs_torch_dequantized"] == pytest.approx(row["torch_dequantized_us"] / row["ours_us"])
        assert row["ours_1t_cpu_gbps"] > 0 and row["stream_1t_cpu_gbps"] > 0
        if "vllm_us" in row:
            assert row["speedup_vs_vllm"] == pytest.approx(row["vllm_us"] / row["ours_us"])


def _bench_rows(*args):
    return run_cli("vllm_gdn_cpu.tools.bench", *args, "--json", "--repeat", "1")["rows"]


def test_bench_kda_json():
    """bench kda-prefill / kda-decode: ours, the plain-torch reference and the roofline figures."""
    (row,) = _bench_rows("kda-prefill", "--models", "kimi-linear-tp4", "--workloads", "16x128", "--cpu-time")
    assert row["ours_tok_s"] > 0 and row["speedup_vs_torch_ref"] > 0 and row["pct_of_path_gemm_peak"] > 0
    assert row["ours_1t_pct_of_matmul"] > 0
    rows = _bench_rows("kda-decode", "--models", "kimi-linear-tp4", "--batches", "2", "--layers", "2",
                       "--state-dtypes", "float32,bfloat16")
    assert [r["state_dtype"] for r in rows] == ["float32", "bfloat16"]
    for r in rows:
        assert r["ours_gbps"] > 0 and r["ours_pct_of_stream"] > 0 and r["torch_ref_us_per_layer"] > 0


def test_bench_mamba_json():
    """bench mamba1-* (no vLLM CPU op exists: ours vs the torch reference) and mamba2-* (also vLLM's)."""
    (row,) = _bench_rows("mamba1-prefill", "--models", "mamba-130m", "--workloads", "16x128")
    assert row["ours_tok_s"] > 0 and row["speedup_vs_torch_ref"] > 0 and "vllm_tok_s" not in row
    rows = _bench_rows("mamba1-decode", "--models", "mamba-130m", "--batches", "2", "--layers", "2",
                       "--state-dtypes", "float32,bfloat16")
    assert [r["state_dtype"] for r in rows] == ["float32", "bfloat16"]
    for r in rows:
        assert r["ours_gbps"] > 0 and 0 < r["ours_pct_of_stream"] <= r["ours_pct_of_stream_with_A"]
    rows = _bench_rows("mamba2-prefill", "--models", "mamba2-2.7b", "--workloads", "16x128")
    assert rows and all(r["ours_tok_s"] > 0 and r["pct_of_path_gemm_peak"] > 0 for r in rows)


def test_bench_decays_side_by_side():
    """--decays: realistic by default (per-head decays spread from weak to strong); benign,strong
    times each case under both, the second row with its time ratio against the first."""
    (row,) = _bench_rows("kda-decode", "--models", "kimi-linear-tp4", "--batches", "2", "--layers", "2",
                         "--state-dtypes", "float32", "--no-ref")
    assert row["decays"] == "realistic" and row["decay_nats_p1"] < 0.05 and row["decay_nats_p99"] > 3
    rows = _bench_rows("prefill", "--models", "qwen3.5-small", "--workloads", "16x128", "--no-ref", "--no-vllm",
                       "--decays", "benign,strong")
    benign, strong = rows
    assert (benign["decays"], strong["decays"]) == ("benign", "strong")
    assert benign["decay_nats_p99"] < 0.2 and strong["decay_nats_p1"] > 0.3
    assert "ours_time_vs_benign" not in benign
    assert strong["ours_time_vs_benign"] == pytest.approx(benign["ours_tok_s"] / strong["ours_tok_s"])
    proc = subprocess.run([sys.executable, "-m", "vllm_gdn_cpu.tools.bench", "decode", "--decays", "mild"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--decays" in proc.stderr
