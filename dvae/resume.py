"""`resume=RUN_DIR` and `resume=auto`: which run directory, config and checkpoint a run continues from.

    dvae-train resume=outputs/2026-11-24/10-00-00                  # continue that run where it stopped
    dvae-train resume=outputs/... trainer.max_steps=3000           # ... and train it for longer
    dvae-train hydra.run.dir=/ckpt/run1 resume=auto                # SLURM requeue: continue if started

The run's own `config.yaml` is the config; keys given on the command line next to `resume` replace its
values, but a config group (data=..., model=...) cannot change under a run.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .checkpointing import LAST
from .errors import ConfigError
from .files import load_weights

GROUPS = ("data", "model", "scale", "strategy", "logger", "experiment", "hparams_search")


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / LAST


def resolve_resume(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> tuple[DictConfig, Path, Path | None]:
    """(config, run directory, checkpoint to resume from or None for a fresh start)."""
    value = cfg.get("resume")
    if not value:
        return cfg, run_dir, None
    if value == "auto":
        checkpoint = last_checkpoint(run_dir)
        return cfg, run_dir, checkpoint if checkpoint.is_file() else None
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"resume={value} is not a directory; pass the directory of an earlier run (it holds "
                          "config.yaml and checkpoints/last.ckpt), or resume=auto.")
    checkpoint = last_checkpoint(path)
    if not (path / "config.yaml").is_file() or not checkpoint.is_file():
        missing = "config.yaml" if not (path / "config.yaml").is_file() else f"checkpoints/{LAST}"
        raise ConfigError(f"resume={value} has no {missing}, so it is not a run directory that can be resumed; "
                          "pass the directory that dvae-train printed at the end of the run.")
    saved = OmegaConf.load(path / "config.yaml")
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        if key == "resume" or key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        if key in GROUPS:
            raise ConfigError(f"{override} cannot change the {key} of the run being resumed; drop it, or start a "
                              "new run without resume=.")
        with open_dict(saved):
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    with open_dict(saved):
        saved.resume = str(value)
    return saved, path, checkpoint


def checkpoint_step(path: Path) -> int:
    """The global step stored in a Lightning checkpoint, read without loading its tensors."""
    checkpoint = load_weights(path, mmap=True)
    return int(checkpoint["global_step"])
