"""scripts/benchmark.py runs end to end (a --quick smoke run) and writes every figure it promises."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


@pytest.mark.slow
def test_the_quick_benchmark_writes_every_measurement(tmp_path):
    out = tmp_path / "benchmark.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["loss"]["ms"]) == {"seed", "eager", "fused"} and data["loss"]["fused_vs_float64_abs_diff"] < 1e-4
    assert data["peak"]["gflops"] > 0
    (row,) = data["training"]
    assert row["images_per_s_preloaded"] > 0 and row["images_per_s_real_data"] > 0 and row["gflop_per_step"] > 0
    assert 0 < row["fraction_of_matmul_peak"]
    assert [m["K"] for m in data["memory"]] == [512, 8192] and all(m["peak_mb"] > 0 for m in data["memory"])
    assert data["encode"]["images_per_s"] > 0
    assert "| seed |" in result.stdout and "matmul peak" in result.stdout
