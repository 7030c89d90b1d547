"""What survives what: SIGKILL + resume, SIGTERM, a full disk during a save, non-finite updates, bad paths.

Runs that are killed go through the installed `dvae-train` command in a subprocess, like a user's.
"""

import csv
import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import dvae.training.checkpointing
from dvae.data.datamodule import DVAEDataModule
from dvae.errors import ConfigError, TrainingError
from dvae.training.loggers import build_loggers
from dvae.training.resume import checkpoint_step
from dvae.training.run import train
from tests.conftest import DVAE_TRAIN, FAST, run_cli

# 4 batches per epoch and a checkpoint every 5 updates: checkpoints fall inside epochs.
STEPS = 24
RUN = [*FAST, "data.crop_size=16", "trainer.deterministic=true", "checkpoint.every_n_steps=5",
       f"trainer.max_steps={STEPS}", "trainer.val_check_interval=12",
       "trainer.log_every_n_steps=3"]  # the metrics reach the logger every third update: also after a resume


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.Popen([DVAE_TRAIN, *RUN, f"hydra.run.dir={run_dir}", *extra], cwd=run_dir.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def stop_after_first_checkpoint(process: subprocess.Popen, run_dir: Path, sig: int) -> tuple[str, str]:
    """Freeze the run as soon as its first checkpoint exists, then send `sig`."""
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.is_file():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    if sig == signal.SIGKILL:
        process.send_signal(signal.SIGSTOP)
    process.send_signal(sig)
    return process.communicate(timeout=120)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def logged_losses(run_dir: Path, after: int) -> dict[int, float]:
    rows = csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
    return {int(row["step"]): float(row["train/loss"]) for row in rows
            if row.get("train/loss") and int(row["step"]) > after}


def assert_same_run(a: Path, b: Path, after: int) -> None:
    state_a, state_b = final_state(a), final_state(b)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        diff = (state_a[key].double() - state_b[key].double()).abs().max().item() if state_a[key].numel() else 0
        assert diff <= 1e-6, f"{key} differs by {diff}"
    losses_a, losses_b = logged_losses(a, after), logged_losses(b, after)
    assert losses_a and losses_a.keys() == losses_b.keys()
    for step in losses_a:
        assert abs(losses_a[step] - losses_b[step]) <= 1e-6, (step, losses_a[step], losses_b[step])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_cli(*RUN, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    stop_after_first_checkpoint(start(run_dir), run_dir, signal.SIGKILL)
    killed_at = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    assert 0 < killed_at < STEPS and killed_at % 4, "the kill should fall inside an epoch"
    result = run_cli(f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'resume-invocation'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {run_dir} from step {killed_at}" in result.stderr
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == STEPS
    assert not list((run_dir / "checkpoints").glob(".*.tmp")), "a save cut by the kill was not cleaned up"
    assert_same_run(uninterrupted, run_dir, after=killed_at)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "name", "code"), [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "Ctrl-C", 130)])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_say_how_to_resume(uninterrupted, tmp_path, sig, name, code):
    run_dir = tmp_path / "run"
    process = start(run_dir)
    _, stderr = stop_after_first_checkpoint(process, run_dir, sig)
    assert process.returncode == code, stderr[-3000:]
    stopped_at = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    assert f"{name} at step {stopped_at}" in stderr
    assert f"dvae-train resume={run_dir}" in stderr
    result = run_cli("resume=auto", f"hydra.run.dir={run_dir}", *RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(uninterrupted, run_dir, after=stopped_at)


class NaNBatches:
    """The real training loader, with NaN images for the updates numbered first ... last (1-based)."""

    def __init__(self, loader, first: int, last: float):
        self.loader, self.first, self.last, self.served = loader, first, last, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.served += 1
            yield torch.full_like(batch, float("nan")) if self.first <= self.served <= self.last else batch


def nan_batches(first: int, last: float = float("inf")):
    original = DVAEDataModule.train_dataloader
    return lambda self: NaNBatches(original(self), first, last)


def test_a_non_finite_update_is_skipped_and_counted(fast_config, tmp_path, monkeypatch):
    monkeypatch.setattr(DVAEDataModule, "train_dataloader", nan_batches(3, 3))
    cfg = fast_config("trainer.max_steps=4", "data.crop_size=16")
    train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["skipped_updates"] == 1 and metrics["steps"] == 4
    assert all(torch.isfinite(v).all() for v in final_state(tmp_path).values() if v.is_floating_point())


def test_non_finite_updates_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(fast_config, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setattr(DVAEDataModule, "train_dataloader", nan_batches(4))
    cfg = fast_config("trainer.max_steps=20", "data.crop_size=16", "guard.max_bad_steps=3",
                      "checkpoint.every_n_steps=2")
    with pytest.raises(TrainingError) as error:
        train(cfg, tmp_path)
    message = str(error.value)
    assert "3 updates in a row (steps 4-6" in message
    assert f"last good checkpoint is {tmp_path / 'checkpoints' / 'last.ckpt'}" in message
    state = final_state(tmp_path)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(fast_config, tmp_path, monkeypatch):
    real_save = torch.save
    saves = []

    def save_then_fill_the_disk(obj, file):
        saves.append(1)
        if len(saves) == 1:
            return real_save(obj, file)
        file.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dvae.training.checkpointing.torch, "save", save_then_fill_the_disk)
    cfg = fast_config("trainer.max_steps=6", "data.crop_size=16", "checkpoint.every_n_steps=2",
                      "trainer.val_check_interval=100")
    with pytest.raises(TrainingError, match="No space left on device"):
        train(cfg, tmp_path)
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]  # no partial or temporary file
    assert checkpoint_step(checkpoints / "last.ckpt") == 2


def test_an_unwritable_run_directory_is_refused_before_training(fast_config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot be written"):
        train(fast_config(), blocker / "run")


def test_resume_of_a_missing_or_unfinished_directory_is_one_sentence(tmp_path):
    result = run_cli(f"resume={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "resume=" in result.stderr and "is not a directory" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_cli(f"resume={tmp_path / 'empty'}", f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path)
    assert result.returncode == 2 and "has no config.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_wandb_continues_the_same_run_id(fast_config, tmp_path):
    cfg = fast_config("logger=wandb")
    first, second = build_loggers(cfg, tmp_path)[0], build_loggers(cfg, tmp_path, resume_step=3)[0]
    assert first._wandb_init["id"] == second._wandb_init["id"] == (tmp_path / "wandb-run-id.txt").read_text().strip()
    assert second._wandb_init["resume"] == "allow"


def test_a_checkpoint_whose_decoder_does_not_fit_the_loss_is_refused_in_one_sentence(fast_config, tmp_path):
    """An l1 run from before l1 had a scale output (3 decoder maps) cannot continue under today's rule
    (6 maps with scale=learned): one sentence, not a size-mismatch traceback from load_state_dict."""
    from dvae.errors import ConfigError
    from dvae.training.resume import check_decoder_output

    checkpoint = tmp_path / "last.ckpt"
    torch.save({"global_step": 4, "state_dict": {"model.decoder.blocks.output.conv.weight": torch.zeros(3, 8, 1, 1)}},
               checkpoint)
    with pytest.raises(ConfigError, match=r"has a decoder with 3 output maps but loss=l1 scale=learned now builds "
                                          r"one with 6 .*start a new run\.$"):
        check_decoder_output(checkpoint, fast_config("loss=l1", "scale=learned"))
    check_decoder_output(checkpoint, fast_config("loss=l1", "scale=constant", "scale.value=0.1"))  # 3 maps: fits
