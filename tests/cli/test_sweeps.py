"""Sweeps: the basic grid, Optuna, the submitit launcher, a failing job, and what a multirun refuses."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dvae.training.config_checks
from dvae.errors import ConfigError
from dvae.training.config_checks import check_sweep_extra, validate_sweep
from dvae.training.run import train
from dvae.training.sweep_report import write_report
from tests.conftest import FAST

DVAE_TRAIN = shutil.which("dvae-train", path=str(Path(sys.executable).parent)) or "dvae-train"


def multirun(*args, cwd, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([DVAE_TRAIN, *args, *FAST, "data=shapes"], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((d for d in sweep_dir.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))


def overrides(job_dir: Path) -> list[str]:
    return yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())


@pytest.mark.slow
def test_grid_sweep_runs_one_job_per_value_and_the_report_reads_it(tmp_path):
    sweep = tmp_path / "sweep"
    result = multirun("hparams_search=scale_grid", "scale.value=0.1,0.2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_dirs(sweep)
    assert [d.name for d in jobs] == ["0", "1"]
    assert (sweep / "multirun.yaml").is_file()
    for job, value in zip(jobs, ("0.1", "0.2")):
        assert f"scale.value={value}" in overrides(job)
        assert yaml.safe_load((job / "config.yaml").read_text())["scale"] == {"mode": "constant", "value": float(value)}
        assert json.loads((job / "metrics.json").read_text())["steps"] == 4
        assert json.loads((job / "status.json").read_text()) == {"status": "finished"}
    text = write_report(sweep, make_plot=False)
    assert "| job | scale.value | PSNR |" in text
    assert "| 0 | 0.1 |" in text and "| 1 | 0.2 |" in text


@pytest.mark.slow
def test_optuna_sweep_runs_two_trials_and_records_the_best(tmp_path):
    sweep = tmp_path / "sweep"
    result = multirun("hparams_search=scale_optuna", "hydra.sweeper.n_trials=2", "optimized_metric=psnr_edges",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_dirs(sweep)
    assert len(jobs) == 2
    values = [float(o.split("=")[1]) for job in jobs for o in overrides(job) if o.startswith("scale.value=")]
    assert len(values) == 2 and all(0.01 <= v <= 1.0 for v in values)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    edges = [json.loads((job / "metrics.json").read_text())["psnr_edges"] for job in jobs]
    assert best["best_value"] == pytest.approx(max(edges), rel=1e-5)  # the trials returned psnr_edges


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_next_job_still_runs(tmp_path):
    sweep = tmp_path / "sweep"
    # job 0's learning rate is refused by its own validation; the sweep goes on with job 1
    result = multirun("-m", "optim.lr=-1,0.01", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode != 0  # the sweep reports its failure at the end
    failed, ok = job_dirs(sweep)
    status = json.loads((failed / "status.json").read_text())
    assert status["status"] == "failed" and "optim.lr=-1 must be a number > 0" in status["error"]
    assert "Traceback" in (failed / "error.txt").read_text()
    assert not (failed / "metrics.json").exists()
    assert json.loads((ok / "metrics.json").read_text())["steps"] == 4
    assert (ok / "logs" / "metrics.csv").is_file()
    text = write_report(sweep, make_plot=False)
    assert "| 1 | 0.01 |" in text
    assert "- job 0 (optim.lr=-1): ConfigError:" in text


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = multirun("-m", "hydra/launcher=submitit_local", "scale=constant", "scale.value=0.1",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = job_dirs(sweep)
    assert json.loads((job / "metrics.json").read_text())["steps"] == 4
    assert (sweep / ".submitit").is_dir()


@pytest.mark.slow
def test_ddp_in_a_multirun_is_refused_before_training(tmp_path):
    sweep = tmp_path / "sweep"
    result = multirun("-m", "strategy=ddp", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "strategy=ddp" in result.stderr and "ddp_spawn" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(sweep.rglob("metrics.json"))


def test_validate_sweep_refuses_ddp_only_in_a_multirun(fast_config):
    with pytest.raises(ConfigError, match="ddp_spawn"):
        validate_sweep(fast_config("strategy=ddp"), multirun=True)
    validate_sweep(fast_config("strategy=ddp"), multirun=False)
    validate_sweep(fast_config("strategy=ddp_spawn"), multirun=True)


@pytest.mark.parametrize("args", [["hparams_search=scale_optuna"], ["-m", "hydra/launcher=submitit_local"],
                                  ["hydra/launcher=submitit_slurm"], ["hydra/sweeper=optuna"]])
def test_a_missing_sweep_plugin_names_the_extra(args, monkeypatch):
    real = dvae.training.config_checks.importlib.util.find_spec
    monkeypatch.setattr(dvae.training.config_checks.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins") else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[sweep\]'"):
        check_sweep_extra(args)
    check_sweep_extra(["hparams_search=scale_grid", "scale.value=0.1,0.2", "hydra/launcher=basic"])


def test_train_returns_the_optimized_metric(fast_config, tmp_path):
    value = train(fast_config("data=shapes", "optimized_metric=psnr_edges"), run_dir=tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert value == pytest.approx(metrics["psnr_edges"]) and value != pytest.approx(metrics["psnr"])
    value = train(fast_config("loss=l1", "optimized_metric=bits_per_dim"), run_dir=tmp_path / "l1")
    assert value == pytest.approx(json.loads((tmp_path / "l1" / "metrics.json").read_text())["bits_per_dim"])
    with pytest.raises(ConfigError, match="optimized_metric=loss is not known"):
        train(fast_config("optimized_metric=loss"), run_dir=tmp_path / "x")


def test_a_stopped_sweep_job_stops_the_sweep(fast_config, tmp_path, monkeypatch, capsys):
    """SIGTERM or Ctrl-C in a sweep job (RunStopped) is recorded in the job's directory and ends the
    process with the signal's exit code, instead of going on to the next job as a failure would."""
    from types import SimpleNamespace

    import dvae.cli.train as train_module

    def stopped(cfg, job_dir):
        raise train_module.RunStopped("SIGTERM at step 3: the run was saved to X", exit_code=143)

    monkeypatch.setattr(train_module, "train", stopped)
    monkeypatch.setattr(train_module, "in_multirun", lambda: True)
    monkeypatch.setattr(train_module, "validate_sweep", lambda cfg: None)
    monkeypatch.setattr(train_module, "hydra_config",
                        lambda: SimpleNamespace(runtime=SimpleNamespace(output_dir=str(tmp_path / "0"))))
    with pytest.raises(SystemExit) as exit_info:
        train_module.hydra_main(fast_config())  # a config passed in goes straight to the function
    assert exit_info.value.code == 143
    assert json.loads((tmp_path / "0" / "status.json").read_text())["status"] == "failed"
    assert "the sweep stops with this job." in capsys.readouterr().err
