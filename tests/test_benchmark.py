"""scripts/benchmark.py runs and writes every figure of the five measurements (a smoke run: the
figures themselves belong to the benchmark, not to tests)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
KEYS = {
    "loss": {"seed_ms", "elementwise_then_mean_ms", "mean_ms", "speedup_elementwise_then_mean", "speedup_mean",
             "first_call_with_compile_s"},
    "training": {"images_per_s_preloaded", "images_per_s_real_data", "real_over_preloaded_step_time",
                 "gflop_per_step", "achieved_gflops", "matmul_gflops_alongside", "fraction_of_matmul_peak",
                 "build_and_first_step_s", "repeats"},
    "memory": {"K", "fused_codebook", "before_step_mb", "peak_mb", "step_adds_mb"},
    "encode": {"images_per_s"},
}


@pytest.mark.slow
def test_quick_benchmark_writes_every_measurement(tmp_path):
    out = tmp_path / "benchmark.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["matmul"]["gflops"] > 0
    assert KEYS["loss"] <= results["loss"].keys()
    for section in ("training", "memory", "encode"):
        assert results[section], section
        for entry in results[section]:
            assert KEYS[section] <= entry.keys(), section
    assert {(m["K"], m["fused_codebook"]) for m in results["memory"]} == {(512, True), (8192, True), (8192, False)}
    figures = [v for section in KEYS for entry in ([results[section]] if section == "loss" else results[section])
               for k, v in entry.items() if k in KEYS[section] and not isinstance(v, bool) and k != "K"]
    assert all(math.isfinite(v) and v >= 0 for v in figures)
    assert "| model | px |" in result.stdout  # the markdown table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_benchmark_refuses_a_gpu_run_without_a_gpu(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr
