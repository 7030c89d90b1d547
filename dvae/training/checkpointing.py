"""Checkpoints that survive a kill: atomic writes, a periodic `last.ckpt`, a save on SIGTERM / Ctrl-C.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed
over the old one: a process killed (or a disk that fills up) in the middle of a save leaves the
previous checkpoint intact and no partial file behind.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dvae.errors import TrainingError
from dvae.files import atomic_write

LAST = "last.ckpt"


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (full disk, permissions); the previous one is intact."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` through `atomic_write`; a failed write is one sentence that says the old file is intact."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda file: torch.save(obj, file))
    except OSError as error:
        raise CheckpointWriteError(
            f"could not write the checkpoint {path} ({error.strerror or error}); the previous checkpoint "
            "there is intact: free some space or point hydra.run.dir at a writable disk, then resume."
        ) from error


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but a save is all or nothing (see `atomic_torch_save`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options.")
        atomic_torch_save(checkpoint, path)


class Interrupted(Exception):
    """Training was asked to stop (Ctrl-C); raised at the end of an update so the state is consistent."""


class RunCheckpoints(L.Callback):
    """`checkpoints/last.ckpt` every `every_n_steps` updates, at the end of training, and when the run is
    stopped by SIGTERM (what SLURM pre-emption sends) or Ctrl-C, so that `resume=RUN_DIR` loses at most
    `every_n_steps` updates after a SIGKILL and none after a SIGTERM.

    Ctrl-C is turned into a stop at the end of the current update (a second Ctrl-C stops at once,
    without a checkpoint). Loggers are flushed before each save, so the logged rows up to the
    checkpoint's step are on disk whenever the checkpoint is.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"checkpoint.every_n_steps={every_n_steps!r} must be a positive integer.")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.saved_step: int | None = None
        self.stop_requested = False
        self.signal_name: str | None = None
        self._previous_sigint = None

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST

    def save(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(self.last_path, weights_only=False)  # the optimiser and loops too: to resume
        self.saved_step = trainer.global_step

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        print("\ndvae-train: Ctrl-C: stopping after this update and saving a checkpoint "
              "(press Ctrl-C again to stop at once, without one).", flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:  # a save that a SIGKILL cut short left its temporary file
            for stale in self.dirpath.glob(f".{LAST}.*.tmp"):
                stale.unlink(missing_ok=True)
        try:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: keep Python's default
            self._previous_sigint = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self.saved_step != trainer.global_step:
            self.save(trainer)
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0 and self.saved_step != trainer.global_step:
            self.save(trainer)
        stop = self.stop_requested
        if trainer.world_size > 1:  # every rank stops at the same update, or the others wait forever
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self.signal_name = "Ctrl-C"
            raise Interrupted("stopped by Ctrl-C")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, SIGTERMException):
            self.signal_name = "SIGTERM"
        elif not isinstance(exception, Interrupted):
            return  # a crash: keep the last periodic checkpoint, whose state is known to be good
        if self.saved_step != trainer.global_step:
            self.save(trainer)
