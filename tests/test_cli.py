"""The bench and info CLIs run and report what they promise (structure only: speed is never
asserted in tests)."""

import json
import subprocess
import sys

import pytest


def run_cli(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)
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
    assert row["bf16_gemm_gflops"] > 0 and 0 < row["pct_of_fp32_gemm_peak"]
    pytest.importorskip("vllm", reason="vLLM's built-in kernel column needs vLLM")
    assert row["vllm_tok_s"] > 0


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
