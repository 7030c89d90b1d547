"""The run directory: writable, not an earlier run's unless asked (resume=, overwrite_run_dir=true)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dvae.errors import ConfigError
from dvae.training.loggers import rank_zero


def check_writable(run_dir: Path) -> None:
    """Refuse an output directory that cannot be written, before any training."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".dvae-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"the run directory {run_dir} cannot be written ({error.strerror or error}); "
                          "set hydra.run.dir (or hydra.sweep.dir) to a writable place.") from error


# What a run writes into its directory (next to Hydra's own .hydra/ and job log); overwrite_run_dir=true
# deletes these, once every check has passed, before a new run starts there.
RUN_OUTPUTS = ("config.yaml", "metrics.json", "bad_files.txt", "wandb-run-id.txt", "checkpoints", "images", "logs",
               "tensorboard", "wandb")


def hydra_files(hydra_cfg: Any) -> set[str]:
    """The names Hydra itself writes into a job's directory before dvae runs (.hydra/, JOB.log)."""
    if hydra_cfg is None:
        return set()
    names = {f"{hydra_cfg.job.name}.log"}
    if hydra_cfg.get("output_subdir"):
        names.add(str(hydra_cfg.output_subdir))
    return names


def check_new_run_dir(cfg: DictConfig, run_dir: Path, ignore: set[str] = frozenset(),
                      dir_key: str = "hydra.run.dir") -> None:
    """Refuse to start a new run in a directory that already holds files (an earlier run's), so that
    nothing there is replaced; `resume=` and `overwrite_run_dir=true` are the ways to use such a directory."""
    if cfg.get("resume") or cfg.get("overwrite_run_dir") is True or not rank_zero():
        return  # ranks > 0 start after rank 0 has written the run's first files
    if not isinstance(cfg.get("overwrite_run_dir"), bool):
        raise ConfigError(f"overwrite_run_dir={cfg.get('overwrite_run_dir')!r} must be true or false.")
    held = sorted(p.name for p in run_dir.iterdir() if p.name not in ignore) if run_dir.is_dir() else []
    if held:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise ConfigError(
            f"the run directory {run_dir} already holds files ({shown}); continue that run with "
            f"resume={run_dir}, choose a new {dir_key}, or add overwrite_run_dir=true to delete the earlier run there."
        )


def clear_run_outputs(run_dir: Path) -> None:
    """overwrite_run_dir=true: remove an earlier run's outputs (only those, see RUN_OUTPUTS)."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
