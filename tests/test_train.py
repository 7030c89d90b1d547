"""End-to-end runs: in-process through `train(cfg)`, and the installed `dvae-train` command."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dvae.training.module import DVAELightning
from dvae.training.run import train

from .conftest import FAST

DVAE_TRAIN = shutil.which("dvae-train", path=str(Path(sys.executable).parent)) or "dvae-train"
METRIC_KEYS = {"psnr", "psnr_mean_color", "bits_per_dim", "perplexity", "codes_used_fraction",
               "steps", "wall_seconds", "gain", "healthy"}


def run_cli(*args, cwd, timeout=240):
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([DVAE_TRAIN, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def check_run_dir(run_dir: Path, steps: int):
    assert (run_dir / "config.yaml").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= metrics.keys()
    assert metrics["steps"] == steps
    assert 0 < metrics["codes_used_fraction"] <= 1 and metrics["perplexity"] >= 1
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert metrics["gain"] == pytest.approx(metrics["psnr"] - metrics["psnr_mean_color"])
    grids = sorted((run_dir / "images").glob("val_step_*.png"))
    assert grids, "no reconstruction grid was written"
    assert [p.name.replace("usage", "val") for p in sorted((run_dir / "images").glob("usage_step_*.png"))] == \
        [p.name for p in grids], "each validation grid has its usage histogram"
    with Image.open(grids[-1]) as image:
        assert image.mode == "RGB" and image.height > 2 * 16
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("data", ["photos", "shapes"])
def test_cli_trains_and_writes_the_run_directory(data, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(f"data={data}", *FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = check_run_dir(run_dir, steps=4)
    assert metrics["bits_per_dim"] > 0
    assert str(run_dir) in result.stdout.replace("\n", "")  # the summary names the run directory
    assert "psnr" in result.stdout
    assert "dvae-train: the run is " in result.stderr  # healthy or not, in one sentence
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/loss", "train/nll", "train/kl", "train/tau", "train/beta", "train/scale",
            "train/lr", "val/psnr", "val/psnr_mean_color", "val/bits_per_dim",
            "val/perplexity", "val/codes_used_fraction", "train/codes_used", "train/perplexity",
            "val/training_seconds"} <= logged
    assert "dvae-train: one dvae training process on this machine's" in result.stderr  # threads=auto says so
    # nothing that is not about this run: no product tips, no notes on Lightning's own defaults, no warnings
    for noise in ("Tip:", "weights_only", "Warning", "warn("):
        assert noise not in result.stdout + result.stderr, noise


@pytest.mark.slow
@pytest.mark.parametrize("args, key", [
    (["data=imagenet3000"], "data"),
    (["scale=constant", "scale.value=-1"], "scale.value=-1"),
    (["data.crop_size=30"], "data.crop_size=30"),
])
def test_cli_bad_input_exits_nonzero_with_a_sentence(args, key, tmp_path):
    result = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_cli_help_lists_groups_and_options(tmp_path):
    result = run_cli("--help", cwd=tmp_path, timeout=60)
    assert result.returncode == 0
    for line in ("data: celeba, cifar10, folder, imagenet, mnist, photos, shapes, webdataset",
                 "scale: constant, cosine, exponential, learned, linear",
                 "strategy: auto, ddp, ddp_spawn, deepspeed, fsdp, slurm, torchrun", "logger: csv, tensorboard, wandb"):
        assert line in result.stdout


def test_trainer_max_time_needs_no_plus_and_ends_the_run_in_time(fast_config, tmp_path):
    cfg = fast_config("trainer.max_steps=1000000", "trainer.max_time=00:00:00:02", "trainer.val_check_interval=100000")
    train(cfg, run_dir=tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 < metrics["steps"] < 1000000 and metrics["wall_seconds"] < 10


def test_scheduled_scale_is_logged_and_follows_the_schedule(fast_config, tmp_path):
    cfg = fast_config("scale=linear", "scale.start=0.4", "scale.end=0.1", "scale.steps=3", "data=shapes")
    train(cfg, run_dir=tmp_path)
    rows = [r for r in csv.DictReader(open(tmp_path / "logs" / "metrics.csv")) if r.get("train/scale")]
    scales = [float(r["train/scale"]) for r in rows]
    assert scales == pytest.approx([0.4, 0.3, 0.2, 0.1], rel=1e-5)


def test_checkpoint_loads_from_its_path_alone(fast_config, tmp_path):
    train(fast_config("data=shapes", "loss=l1"), run_dir=tmp_path)
    module = DVAELightning.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.hparams.loss == "l1" and module.hparams.n_hid == 8
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["bits_per_dim"] > 0  # l1 is the Laplace density of the pixels: it has bits/dim too
    x = torch.rand(2, 3, 32, 32)
    assert module.ema_model.decode(module.ema_model.encode(x)).shape == x.shape


def test_ema_differs_from_the_raw_weights_after_training(fast_config, tmp_path):
    train(fast_config("data=shapes", "ema.decay=0.5"), run_dir=tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    raw, ema = state["model.encoder.blocks.input.weight"], state["ema.module.encoder.blocks.input.weight"]
    assert not torch.equal(raw, ema)


@pytest.mark.parametrize("logger, marker", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_other_loggers_write_their_files(logger, marker, fast_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train(fast_config("data=shapes", f"logger={logger}"), run_dir=tmp_path)
    written = [p for p in (tmp_path / marker).rglob("*") if p.is_file()]
    assert written, f"{logger} wrote nothing under {tmp_path / marker}"
    if logger == "tensorboard":
        assert any("tfevents" in p.name for p in written)
    assert (tmp_path / "metrics.json").is_file()


@pytest.mark.slow
def test_cli_sweeps_the_scale_value(tmp_path):
    """`-m scale.value=A,B` runs one fixed-scale job per value (scale=constant is implied)."""
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "scale.value=0.05,0.2", "data=shapes", *FAST, "trainer.max_steps=2",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, value in (("0", 0.05), ("1", 0.2)):
        config = (sweep / job / "config.yaml").read_text()
        assert "mode: constant" in config and f"value: {value}" in config
        assert json.loads((sweep / job / "metrics.json").read_text())["steps"] == 2


def test_training_seconds_grow_and_leave_validation_out(fast_config, tmp_path, monkeypatch):
    """val/training_seconds (what scripts/time_to_quality.py reads) is logged with each validation during
    training, grows, and does not count the time spent validating."""
    import time

    from dvae.training.module import DVAELightning as Module

    validation_end, calls = Module.on_validation_epoch_end, []

    def slow_validation(self):
        calls.append(time.perf_counter())
        time.sleep(0.5)
        validation_end(self)

    monkeypatch.setattr(Module, "on_validation_epoch_end", slow_validation)
    monkeypatch.setattr(Module, "on_train_start", lambda self: calls.append(time.perf_counter()))
    train(fast_config("trainer.max_steps=6", "trainer.val_check_interval=2"), run_dir=tmp_path)
    rows = [r for r in csv.DictReader(open(tmp_path / "logs" / "metrics.csv")) if r.get("val/training_seconds")]
    seconds = [float(r["val/training_seconds"]) for r in rows]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]  # after updates 2, 4, 6 (steps count from 0)
    assert seconds == sorted(seconds) and seconds[0] > 0
    # calls: training starts, then three validations; the third began before calls[3], and the first
    # two (0.5 s each at least) are not counted
    assert seconds[-1] <= calls[3] - calls[0] - 2 * 0.5 + 0.05, (seconds, calls)


@pytest.mark.parametrize("stop_after", [None, 5], ids=["full", "stopped"])
def test_training_metrics_reach_the_logger_as_when_logged_every_update(stop_after, fast_config, tmp_path, monkeypatch):
    """The module hands its training metrics to Lightning only on the updates the loggers write (a speed-up):
    metrics.csv holds the same training rows as with the plain version that logs every update, a run that
    stops between two logging updates included."""
    import lightning

    from dvae.training.module import DVAELightning as Module

    class StopAfter(lightning.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.should_stop or trainer.global_step == stop_after

    def log_every_update(self, outputs, batch, batch_idx):
        self.log_dict({**self.step_metrics, "train/skipped_updates": float(self.bad_steps_total)},
                      batch_size=batch.shape[0])

    def training_rows(run_dir):
        rows = [r for r in csv.DictReader(open(run_dir / "logs" / "metrics.csv")) if r.get("train/loss")]
        return [{k: v for k, v in r.items() if k == "step" or k.startswith("train/")} for r in rows]

    cfg = fast_config("data=shapes", "trainer.max_steps=8", "trainer.val_check_interval=4",
                      "trainer.log_every_n_steps=3")
    extra = [StopAfter()] if stop_after else []
    train(cfg, run_dir=tmp_path / "gated", extra_callbacks=extra)
    with monkeypatch.context() as patched:
        patched.setattr(Module, "on_train_batch_end", log_every_update)
        train(cfg, run_dir=tmp_path / "plain", extra_callbacks=extra)
    gated = training_rows(tmp_path / "gated")
    assert [int(r["step"]) for r in gated] == ([2, 4] if stop_after else [2, 5])
    assert gated == training_rows(tmp_path / "plain")
