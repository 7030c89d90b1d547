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

from dvae.errors import ConfigError
from dvae.files import load_weights
from dvae.training.checkpointing import LAST

GROUPS = ("data", "model", "scale", "strategy", "logger", "experiment", "hparams_search")
# sections that every run's config.yaml has: without them it is not a run's config
RUN_SECTIONS = ("data", "model", "trainer")
# what the position inside an epoch is counted in (see dvae.data.samplers.ResumableLoader)
BATCH_KEYS = ("data.batch_size", "trainer.devices", "trainer.num_nodes")


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / LAST


def resolve_resume(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> tuple[DictConfig, Path, Path | None]:
    """(config, run directory, checkpoint to resume from or None for a fresh start)."""
    value = cfg.get("resume")
    if not value:
        return cfg, run_dir, None
    if value == "auto":
        checkpoint = last_checkpoint(run_dir)
        if not checkpoint.is_file():
            return cfg, run_dir, None
        if (run_dir / "config.yaml").is_file():
            check_same_batches(_load_run_config(run_dir / "config.yaml", "resume=auto"), cfg, "resume=auto")
        return cfg, run_dir, checkpoint
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"resume={value} is not a directory; pass the directory of an earlier run (it holds "
                          "config.yaml and checkpoints/last.ckpt), or resume=auto.")
    checkpoint = last_checkpoint(path)
    if not (path / "config.yaml").is_file() or not checkpoint.is_file():
        missing = "config.yaml" if not (path / "config.yaml").is_file() else f"checkpoints/{LAST}"
        raise ConfigError(f"resume={value} has no {missing}, so it is not a run directory that can be resumed; "
                          "pass the directory that dvae-train printed at the end of the run.")
    saved = _load_run_config(path / "config.yaml", f"resume={value}")
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        if key == "resume" or key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        if key in GROUPS:
            raise ConfigError(f"{override} cannot change the {key} of the run being resumed; drop it, or start a "
                              "new run without resume=.")
        if key in BATCH_KEYS:
            check_same_batches(saved, cfg, f"resume={value}", (key,))
        with open_dict(saved):
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    with open_dict(saved):
        saved.resume = str(value)
    return saved, path, checkpoint


def _load_run_config(path: Path, option: str) -> DictConfig:
    """A run's config.yaml, or one sentence saying it is damaged (not YAML, or not a run's mapping)."""
    try:
        saved = OmegaConf.load(path)
    except Exception as error:  # yaml's and OmegaConf's parse errors, an unreadable file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{option}: {path} cannot be read ({reason}), so the run's settings are lost; restore "
                          "it from a copy, or start a new run without resume=.") from None
    if not isinstance(saved, DictConfig) or not all(isinstance(saved.get(k), DictConfig) for k in RUN_SECTIONS):
        raise ConfigError(f"{option}: {path} is not a run's config (it lacks the {', '.join(RUN_SECTIONS)} "
                          "sections), so it is damaged; restore it from a copy, or start a new run without resume=.")
    return saved


def check_same_batches(saved: DictConfig, cfg: DictConfig, option: str, keys: tuple[str, ...] = BATCH_KEYS) -> None:
    """A run resumes with the batch size and number of processes its checkpoint's data position was counted in
    (the loader refuses otherwise, but only inside fit, after the run directory has been written to)."""
    for key in keys:
        before, now = OmegaConf.select(saved, key), OmegaConf.select(cfg, key)
        if before is not None and before != now:
            raise ConfigError(f"{key}={now} differs from the {before} of the run being resumed ({option}); a run "
                              f"resumes with the same {', '.join(BATCH_KEYS)}: drop {key}= or set it to {before}.")


def readable_step(checkpoint: Path) -> int:
    """The checkpoint's step, or one sentence saying that the file is damaged (before anything is written)."""
    try:
        return checkpoint_step(checkpoint)
    except ConfigError:
        raise
    except Exception as error:  # torch's zip reader, pickle, a missing global_step: all mean a damaged file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{checkpoint} cannot be read ({reason}), so the run cannot continue from it; restore it "
                          "from a copy, or start a new run without resume=.") from None


def checkpoint_step(path: Path) -> int:
    """The global step stored in a Lightning checkpoint, read without loading its tensors."""
    checkpoint = load_weights(path, mmap=True)
    return int(checkpoint["global_step"])


def check_decoder_output(checkpoint: Path, cfg: DictConfig) -> None:
    """Refuse, in one sentence, a checkpoint whose decoder output does not fit the run's loss and scale: a
    loss=l1/mse run from before those losses had a scale has no ln b output even with scale=learned."""
    from dvae.model import predicts_scale

    weight = load_weights(checkpoint, mmap=True).get("state_dict", {}).get("model.decoder.blocks.output.conv.weight")
    channels = int(cfg.data.channels)
    expected = 2 * channels if predicts_scale(cfg.loss, cfg.scale.mode) else channels
    if weight is not None and weight.shape[0] != expected:
        raise ConfigError(
            f"{checkpoint} has a decoder with {weight.shape[0]} output maps but loss={cfg.loss} scale={cfg.scale.mode} "
            f"now builds one with {expected} (loss=l1 and mse gained a scale output); finish that run with the dvae "
            "version that started it, or start a new run."
        )
