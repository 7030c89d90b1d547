"""scripts/benchmark.py runs and writes every figure of the five measurements (a smoke run: the
figures themselves belong to the benchmark, not to tests); its limit; scripts/time_to_quality.py's reading."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "benchmark.py"
KEYS = {
    "loss": {"seed_ms", "elementwise_then_mean_ms", "mean_ms", "speedup_elementwise_then_mean", "speedup_mean",
             "first_call_with_compile_s"},
    "training": {"precision", "images_per_s_preloaded", "images_per_s_real_data", "real_over_preloaded_step_time",
                 "gflop_per_step", "achieved_gflops", "matmul_gflops_alongside", "fraction_of_limit",
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
    assert results["matmul"]["32"]["gflops"] > 0
    assert results["precisions"] == ["32"]  # a quick run measures float32 only
    limit = results["limits"]["32"]
    assert len(limit["paths_gflops"]) == 4 and all(v > 0 for v in limit["paths_gflops"].values())
    assert limit["gflops"] >= max(limit["paths_gflops"].values())  # never below a measured path
    if limit["theoretical"]:
        assert limit["gflops"] >= limit["theoretical"]["gflops"]
    assert all(0 < entry["fraction_of_limit"] <= 1 for entry in results["training"])
    assert "of the limit |" in result.stdout and "| measured: torch.mm" in result.stdout
    assert KEYS["loss"] <= results["loss"].keys()
    for section in ("training", "memory", "encode"):
        assert results[section], section
        for entry in results[section]:
            assert KEYS[section] <= entry.keys(), section
    assert {(m["K"], m["fused_codebook"]) for m in results["memory"]} == {(512, True), (8192, True), (8192, False)}
    figures = [v for section in KEYS for entry in ([results[section]] if section == "loss" else results[section])
               for k, v in entry.items() if k in KEYS[section] and not isinstance(v, (bool, str)) and k != "K"]
    assert all(math.isfinite(v) and v >= 0 for v in figures)
    assert "| model | px |" in result.stdout  # the markdown table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_benchmark_refuses_a_gpu_run_without_a_gpu(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags, vendor, dtype, per_cycle", [
    ({"avx", "avx2", "fma", "avx512f"}, "GenuineIntel", torch.float32, 64),  # 16 lanes x 2 FMA units x 2
    ({"avx", "avx2", "fma", "avx512f"}, "AuthenticAMD", torch.float32, 32),  # Zen 4: AVX-512 on 256-bit units
    ({"avx", "avx2", "fma", "avx512f", "avx512_vp2intersect"}, "AuthenticAMD", torch.float32, 64),  # Zen 5
    ({"avx", "avx2", "fma"}, "AuthenticAMD", torch.float32, 32),
    ({"avx"}, "GenuineIntel", torch.float32, 16),  # no FMA: a multiply and an add unit
    ({"avx512f", "fma", "avx512_bf16"}, "GenuineIntel", torch.bfloat16, 128),
    ({"avx512f", "fma", "avx512_bf16", "amx_bf16"}, "GenuineIntel", torch.bfloat16, 1024),
])
def test_theoretical_peak_is_cores_times_flops_per_cycle_times_clock(flags, vendor, dtype, per_cycle):
    benchmark = load_script("benchmark")
    peak = benchmark.theoretical_cpu_peak(dtype, cores=2, flags=flags, vendor=vendor, ghz=2.5)
    assert peak["flops_per_cycle"] == per_cycle
    assert peak["gflops"] == pytest.approx(2 * per_cycle * 2.5)
    assert benchmark.theoretical_cpu_peak(dtype, 2, flags, vendor, ghz=None) is None


def test_the_limit_is_never_below_a_measured_path(monkeypatch):
    benchmark = load_script("benchmark")
    monkeypatch.setattr(benchmark, "cpu_flags", lambda: ({"avx2"}, "GenuineIntel", 0.001))  # a theory far too low
    limit = benchmark.machine_limit("cpu", torch.float32, repeats=1, quick=True, cores=1)
    assert limit["gflops"] == max(limit["paths_gflops"].values()) > limit["theoretical"]["gflops"]


def test_time_to_quality_reads_the_first_validation_past_each_threshold(tmp_path):
    ttq = load_script("time_to_quality")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.csv").write_text(
        "step,train/loss,val/psnr,val/psnr_mean_color,val/training_seconds\n"
        "9,0.5,,,\n"
        "49,,21.0,19.0,10.0\n"  # +2
        "99,,22.5,19.0,20.0\n"  # +3.5
        "149,,24.1,19.0,30.0\n"  # +5.1
        "199,,23.0,19.0,40.0\n"
        "199,,24.0,19.0,\n")  # the final validation after training: no training clock, not counted
    rows = ttq.validations(tmp_path)
    assert [row["step"] for row in rows] == [49, 99, 149, 199]
    assert ttq.first_crossing(rows, 3.0)["seconds"] == 20.0
    assert ttq.first_crossing(rows, 5.0)["step"] == 149
    assert ttq.first_crossing(rows, 6.0) is None
    runs = [{"reached": {"+3 dB": {"seconds": s3}, "+5 dB": {"seconds": s5} if s5 else None}}
            for s3, s5 in ((20.0, 30.0), (10.0, None), (40.0, 50.0))]
    summary = ttq.summarise(runs)
    assert summary["+3 dB"] == {"median_seconds": 20.0, "seeds_reached": 3, "seeds": 3}
    assert summary["+5 dB"] == {"median_seconds": 50.0, "seeds_reached": 2, "seeds": 3}  # the miss counts as slowest


def test_time_to_quality_refuses_a_folder_that_holds_files(tmp_path, capsys):
    ttq = load_script("time_to_quality")
    (tmp_path / "earlier.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        ttq.main(["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "already holds files" in capsys.readouterr().err
    assert (tmp_path / "earlier.json").read_text() == "{}"
