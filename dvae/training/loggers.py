"""The run's logger (`logger=csv|tensorboard|wandb`), built so that a resumed run continues its log.

Lightning's CSVLogger deletes an existing `metrics.csv` when it starts; `AppendingCSVLogger` keeps it and
appends (also when ddp_spawn starts fresh processes for the final validation). On resume, the rows
logged after the checkpoint's step are dropped first, since the resumed run logs those steps again.
wandb continues the same run: its id is kept in the run directory.
"""

from __future__ import annotations

import csv
import io
import os
import uuid
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from dvae.files import atomic_write


def rank_zero() -> bool:
    """True in the process that writes files (rank 0); under the ddp launcher every rank runs train()."""
    return getattr(rank_zero_only, "rank", 0) == 0


class AppendingWriter(ExperimentWriter):
    """Appends to an existing metrics.csv (keeping its columns) instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class AppendingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def drop_rows_after(metrics_csv: Path, step: int) -> None:
    """Keep the rows of a CSV log logged at or before `step` (the resumed checkpoint's)."""
    if not metrics_csv.is_file():
        return
    with metrics_csv.open(newline="") as file:
        reader = csv.DictReader(file)
        rows = [row for row in reader if not row.get("step") or int(float(row["step"])) <= step]
        header = list(reader.fieldnames or [])
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(metrics_csv, lambda file: file.write(text.getvalue().encode("utf-8")))


def wandb_online() -> bool:
    """Online only when the user has configured an account (an API key or a netrc entry)."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_run_id(run_dir: Path) -> str:
    """The run directory's wandb id, created on first use, so that a resumed run logs to the same run."""
    id_file = run_dir / "wandb-run-id.txt"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:8]
    if rank_zero():
        id_file.write_text(run_id + "\n")
    return run_id


def build_loggers(cfg: DictConfig, run_dir: Path, resume_step: int | None = None) -> list:
    name = cfg.logger.name
    if name == "csv":
        if resume_step is not None and rank_zero():
            drop_rows_after(run_dir / "logs" / "metrics.csv", resume_step)
        return [AppendingCSVLogger(save_dir=run_dir, name="logs", version="")]
    if name == "tensorboard":
        return [TensorBoardLogger(save_dir=run_dir, name="tensorboard", version="")]
    offline = cfg.logger.offline
    offline = not wandb_online() if offline == "auto" else bool(offline)
    return [WandbLogger(project=cfg.logger.project, entity=cfg.logger.get("entity"), save_dir=str(run_dir),
                        offline=offline, id=wandb_run_id(run_dir), resume="allow",
                        config=OmegaConf.to_container(cfg, resolve=True))]


def close_loggers(loggers: list, status: str = "success") -> None:
    """Finish every logger, so that one multirun job never leaks into the next."""
    for logger in loggers:
        logger.finalize(status)
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish(exit_code=0 if status == "success" else 1)
