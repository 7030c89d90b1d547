"""One training run: checks, the run directory, fit, the final validation, metrics.json and the verdict."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError

from dvae.errors import ConfigError, TrainingError
from dvae.training.builders import build_module, build_trainer, load_init_from
from dvae.training.config_checks import apply_scale_shorthand, validate_config
from dvae.training.heap import keep_freed_memory_in_heap
from dvae.training.hydra_run import command_line_overrides, hydra_config, in_multirun
from dvae.training.loggers import build_loggers, close_loggers, rank_zero
from dvae.training.pictures import write_run_pictures
from dvae.training.run_dir import check_new_run_dir, check_writable, clear_run_outputs, hydra_files

# Noise from Lightning's internals on current torch; nothing a user can act on.
warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")
# DVAELightning.on_after_batch_transfer (the channels-last layout) is meant to apply to the data module's batches.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")


class NoAdvertisements(logging.Filter):
    """Lightning's tips recommend other products; a run prints only what is about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(NoAdvertisements())


def print_summary(metrics: dict[str, Any], run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="final validation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    console.print(f"run directory: {run_dir}")


@contextlib.contextmanager
def damaged_config_refused(resumed: DictConfig | None):
    """A key missing from a resumed run's config.yaml (damaged or hand-edited) is one sentence, not a traceback."""
    try:
        yield
    except ConfigAttributeError as error:
        if resumed is None:
            raise
        raise ConfigError(f"resume={resumed.resume}: its config.yaml has no {error.full_key}, so it is damaged; "
                          "restore it from a copy, or start a new run without resume=.") from None


def train(cfg: DictConfig, run_dir: str | Path | None = None, extra_callbacks: list | None = None) -> float:
    """Train one dVAE; returns the final validation value of `cfg.optimized_metric` (default psnr),
    what sweepers optimise (NaN where the run has no such value). `extra_callbacks` are added to the
    Trainer's (diagnostics such as scripts/trace_training.py)."""
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from dvae.data.datamodule import build_datamodule
    from dvae.training.callbacks import CodebookMonitor, ReconstructionGrid, ShareCores, TrainingClock
    from dvae.training.checkpointing import Interrupted, RunCheckpoints
    from dvae.training.resume import check_decoder_output, checkpoint_step, readable_step, resolve_resume
    from dvae.training.usage import run_verdict

    hydra_cfg = hydra_config()
    if run_dir is None:
        run_dir = hydra_cfg.runtime.output_dir
    # Every check first, then the first write: a refused run leaves the run directory as it was.
    overrides = command_line_overrides()
    cfg, run_dir, resume_from = resolve_resume(cfg, Path(run_dir), overrides)
    resume_step = readable_step(resume_from) if resume_from is not None else None
    if resume_from is not None:
        check_decoder_output(resume_from, cfg)
    hydra_dir = hydra_cfg is not None and Path(hydra_cfg.runtime.output_dir).resolve() == run_dir.resolve()
    check_new_run_dir(cfg, run_dir, hydra_files(hydra_cfg) if hydra_dir else set(),
                      "hydra.sweep.dir" if in_multirun() else "hydra.run.dir")
    with damaged_config_refused(cfg if resume_from is not None else None):
        apply_scale_shorthand(cfg, overrides)
        pretrained = load_init_from(cfg) if resume_from is None else None
        validate_config(cfg)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        try:
            module = build_module(cfg)
        except (ValueError, TypeError) as error:  # a setting the model or a schedule refuses, e.g. scale.log_floor=nan
            raise ConfigError(f"{error}") from error
        datamodule = build_datamodule(cfg.data, seed=cfg.seed)
    check_writable(run_dir)
    if rank_zero():
        if cfg.get("overwrite_run_dir") and not cfg.get("resume"):
            clear_run_outputs(run_dir)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    if pretrained is not None:
        module.model.load_state_dict(pretrained.state_dict())
        module.ema.module.load_state_dict(pretrained.state_dict())
    if resume_from is not None:  # checkpoints/ holds the run's own checkpoints: nothing to warn about
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    if resume_from is not None and rank_zero():
        print(f"dvae-train: resuming {run_dir} from step {resume_step} ({resume_from})", file=sys.stderr)
    loggers = build_loggers(cfg, run_dir, resume_step)
    best = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/psnr", mode="max",
                           save_top_k=1, auto_insert_metric_name=False)
    last = RunCheckpoints(run_dir / "checkpoints", every_n_steps=cfg.checkpoint.every_n_steps)
    grid = ReconstructionGrid(run_dir / "images")
    monitor = CodebookMonitor(cfg.codebook.collapse_below, stop=bool(cfg.codebook.stop_on_collapse))
    threads = ShareCores(cfg.get("threads", "auto"))
    callbacks = [best, last, grid, monitor, TrainingClock(), threads, *(extra_callbacks or [])]
    threads_before = torch.get_num_threads()
    if cfg.progress_bar and sys.stderr.isatty():
        callbacks.append(RichProgressBar())
    trainer = build_trainer(cfg, run_dir, loggers, callbacks)
    keep_freed_memory_in_heap()
    start = time.perf_counter()
    status = "failed"
    # Subnormal floats take a slow path on x86 CPUs (a default step became 28x slower, docs/benchmarks.md);
    # flushing them to zero changes nothing above 1e-38. Process-wide, so it is switched back off at the end.
    torch.set_flush_denormal(True)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        wall = time.perf_counter() - start
        final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        status = "success"
    except (SIGTERMException, Interrupted) as error:
        raise RunStopped(
            f"{last.signal_name or type(error).__name__} at step {trainer.global_step}: the run was saved to "
            f"{last.last_path}; continue it with: dvae-train resume={run_dir}",
            exit_code=130 if last.signal_name == "Ctrl-C" else 143,
        ) from None
    except TrainingError as error:
        saved = last.last_path if last.last_path.is_file() else None
        where = (f"the last good checkpoint is {saved} (step {checkpoint_step(saved)})" if saved
                 else "no checkpoint was written")
        raise TrainingError(f"{error}; {where}.") from error
    finally:
        bad_files = datamodule.take_bad_files()
        torch.set_flush_denormal(False)
        threads.release()
        torch.set_num_threads(threads_before)
        close_loggers(loggers, status)
    metrics = {
        "psnr": final["val/psnr"],
        "psnr_mean_color": final["val/psnr_mean_color"],
        "psnr_edges": final.get("val/psnr_edges"),
        "ssim": final.get("val/ssim"),
        "bits_per_dim": final.get("val/bits_per_dim"),
        "perplexity": final["val/perplexity"],
        "codes_used_fraction": final["val/codes_used_fraction"],
        "steps": trainer.global_step,
        "val_images": int(final["val/images"]),
        "skipped_updates": module.bad_steps_total,
        "world_size": trainer.world_size,
        "wall_seconds": round(wall, 2),
    }
    metrics["gain"] = metrics["psnr"] - metrics["psnr_mean_color"]
    metrics["healthy"], verdict = run_verdict(metrics["gain"], metrics["codes_used_fraction"], int(cfg.model.K),
                                              float(cfg.codebook.collapse_below), module.collapse_advice())
    metrics["bad_files"] = len(bad_files)
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        try:  # pictures of a finished run: one that cannot be drawn costs the picture, not the run
            write_run_pictures(run_dir, module.ema_model, getattr(module, "last_val_code_counts", None))
        except (OSError, ValueError, RuntimeError) as error:
            print(f"dvae-train: the run's pictures could not be drawn ({error}); its results are intact.",
                  file=sys.stderr)
        print_summary(metrics, run_dir)
        print(f"dvae-train: {verdict}", file=sys.stderr)
        if bad_files:
            (run_dir / "bad_files.txt").write_text("".join(f"{path}\t{why}\n" for path, why in bad_files))
            print(f"dvae-train: {len(bad_files)} unreadable file(s) were skipped; they are listed in "
                  f"{run_dir / 'bad_files.txt'}", file=sys.stderr)
    value = metrics[cfg.get("optimized_metric", "psnr")]
    return float("nan") if value is None else float(value)


class RunStopped(TrainingError):
    """SIGTERM or Ctrl-C stopped the run after saving it; carries the conventional exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def record_failure(job_dir: Path, error: BaseException) -> None:
    """Mark a sweep job as failed: `status.json` (read by dvae-report) and the traceback in `error.txt`."""
    job_dir.mkdir(parents=True, exist_ok=True)
    message = str(error) or type(error).__name__
    status = {"status": "failed", "error": f"{type(error).__name__}: {message}"}
    (job_dir / "status.json").write_text(json.dumps(status, indent=2) + "\n")
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    (job_dir / "error.txt").write_text(text)
