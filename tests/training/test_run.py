"""One training run in-process, through `train(cfg)`: what it writes, logs and checkpoints."""

import csv
import json

import pytest
import torch

from dvae.training.module import DVAELightning
from dvae.training.run import train


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


def test_a_run_ends_with_its_codebook_atlas_and_training_curves(fast_config, tmp_path):
    from PIL import Image

    train(fast_config(), run_dir=tmp_path)
    with Image.open(tmp_path / "images" / "codebook_atlas.png") as atlas:
        assert atlas.size == (1 + 6 * 17, 1 + 6 * 17)  # K = 32 codes of 4x4 pixels, enlarged to 16, 6 a row
    with Image.open(tmp_path / "images" / "training_curves.png") as curves:
        assert curves.width > 4 * curves.height  # five panels in a row


def test_a_picture_that_cannot_be_drawn_does_not_fail_the_run(fast_config, tmp_path, monkeypatch, capsys):
    import dvae.training.pictures as pictures

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pictures, "save_png", full_disk)
    train(fast_config(), run_dir=tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 4
    assert "the run's pictures could not be drawn" in capsys.readouterr().err
