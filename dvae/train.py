"""`dvae-train`: the Hydra entry point. compose -> validate -> build -> fit -> metrics.json.

    dvae-train                                   # tiny model on the bundled photographs, CPU
    dvae-train scale=constant scale.value=0.2    # the seed's fixed scale
    dvae-train -m scale=constant scale.value=0.05,0.1,0.2
    dvae-train model=dalle data=folder data.root=/data/images trainer.devices=8 strategy=ddp
    dvae-train hparams_search=scale_optuna       # needs pip install -e '.[sweep]'
    dvae-train resume=outputs/2026-11-24/10-00-00  # continue a stopped run exactly where it stopped
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import traceback
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import ConfigError, TrainingError
from .loggers import build_loggers, close_loggers, rank_zero
from .losses import LOSSES
from .schedules import KINDS

PRECISIONS = ("32", "32-true", "64", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
GPU_ONLY_STRATEGIES = ("fsdp", "deepspeed", "deepspeed_stage_2", "deepspeed_stage_3")
# what `train` can return to a sweeper (`optimized_metric`), and which way is better
OPTIMIZABLE = {"psnr": "maximize", "psnr_edges": "maximize", "bits_per_dim": "minimize",
               "perplexity": "maximize", "codes_used_fraction": "maximize"}
# Hydra plugins behind the `sweep` extra: the config option they provide -> their module
SWEEP_PLUGINS = {"hydra/sweeper": ("optuna", "hydra_plugins.hydra_optuna_sweeper"),
                 "hydra/launcher": ("submitit", "hydra_plugins.hydra_submitit_launcher")}


# Noise from Lightning's internals on current torch; nothing a user can act on.
warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")
# DVAELightning.on_after_batch_transfer (the channels-last layout) is meant to apply to the data module's batches.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")


def _number(cfg: DictConfig, key: str) -> float:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be a number.")
    return float(value)


def validate_config(cfg: DictConfig) -> None:
    """Refuse a run that cannot work, with one sentence naming the key, before any training."""
    if cfg.loss not in LOSSES:
        raise ConfigError(f"loss={cfg.loss} is not known; use one of {', '.join(LOSSES)}.")
    mode = cfg.scale.mode
    if mode == "learned":
        if cfg.scale.get("value") is not None:
            raise ConfigError(
                f"scale.value={cfg.scale.value} contradicts scale=learned (the decoder predicts the scale); "
                "drop scale=learned or use scale=constant to train with a fixed scale."
            )
    elif mode == "constant":
        if _number(cfg, "scale.value") <= 0:
            raise ConfigError(
                f"scale.value={cfg.scale.value} must be > 0; the Laplace scale b is positive (the seed used 0.1)."
            )
    elif mode in KINDS:
        for key in ("scale.start", "scale.end"):
            if _number(cfg, key) <= 0:
                value = OmegaConf.select(cfg, key)
                raise ConfigError(f"{key}={value} must be > 0; the Laplace scale b is positive.")
        if _number(cfg, "scale.steps") < 0:
            raise ConfigError(f"scale.steps={cfg.scale.steps} must be >= 0.")
    else:
        raise ConfigError(f"scale.mode={mode} is not known; use scale=learned, constant, linear, cosine, exponential.")
    factor = 2 ** (int(cfg.model.groups) - 1)
    crop = int(cfg.data.crop_size)
    if crop % factor or crop <= 0:
        suggestion = max(factor, round(crop / factor) * factor)
        raise ConfigError(
            f"data.crop_size={crop} is not a multiple of the model's downsampling factor {factor} "
            f"(model.groups={cfg.model.groups}); use e.g. data.crop_size={suggestion}."
        )
    if str(cfg.precision) not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision} is not known; use 32, bf16-mixed or 16-mixed.")
    cuda = torch.cuda.is_available() and cfg.trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda")
    if cfg.strategy.name in GPU_ONLY_STRATEGIES and not cuda:
        raise ConfigError(
            f"strategy={cfg.strategy.name} needs a CUDA GPU and none is available; "
            "use strategy=auto, ddp or ddp_spawn on a CPU."
        )
    if str(cfg.precision).startswith("16") and not cuda:
        raise ConfigError(f"precision={cfg.precision} needs a CUDA GPU; use precision=bf16-mixed or 32 on a CPU.")
    if cfg.logger.name not in ("csv", "tensorboard", "wandb"):
        raise ConfigError(f"logger={cfg.logger.name} is not known; use logger=csv, tensorboard or wandb.")
    world = world_size(cfg)
    if world is not None and int(cfg.data.batch_size) % world:
        batch = int(cfg.data.batch_size)
        raise ConfigError(
            f"data.batch_size={batch} is the global batch and must split evenly over the {world} processes "
            f"(trainer.devices x trainer.num_nodes); use data.batch_size={max(world, round(batch / world) * world)}."
        )
    validate_codebook(cfg)
    for key in ("checkpoint.every_n_steps", "guard.max_bad_steps"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key}={value!r} must be a positive integer.")
    metric = cfg.get("optimized_metric", "psnr")
    if metric not in OPTIMIZABLE:
        raise ConfigError(f"optimized_metric={metric} is not known; use one of {', '.join(OPTIMIZABLE)}.")
    if metric == "bits_per_dim" and cfg.loss != "logit_laplace":
        raise ConfigError(
            f"optimized_metric=bits_per_dim needs loss=logit_laplace (loss={cfg.loss} is not a density); "
            "use optimized_metric=psnr."
        )


def validate_codebook(cfg: DictConfig) -> None:
    """The `codebook.*` keys: the anti-collapse remedies and the usage monitor."""
    weight = _number(cfg, "codebook.usage_weight")
    if not 0 <= weight < float("inf"):
        raise ConfigError(f"codebook.usage_weight={cfg.codebook.usage_weight} must be a finite number >= 0 "
                          "(0 turns the batch-usage term off).")
    for key, low in (("codebook.reseed_every", 0), ("codebook.window", 1)):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{key}={value!r} must be an integer >= {low}"
                              + (" (0 turns re-seeding off)." if low == 0 else "."))
    threshold = _number(cfg, "codebook.collapse_below")
    if not 0 <= threshold <= 1:
        raise ConfigError(f"codebook.collapse_below={cfg.codebook.collapse_below} must be a fraction of the "
                          "codebook in [0, 1] (0 turns the warning off).")
    if not isinstance(cfg.codebook.stop_on_collapse, bool):
        raise ConfigError(f"codebook.stop_on_collapse={cfg.codebook.stop_on_collapse!r} must be true or false.")


def world_size(cfg: DictConfig) -> int | None:
    """Processes in the run when the config says (devices and num_nodes as integers), else None."""
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, int) and devices > 0 and isinstance(nodes, int) and nodes > 0:
        return devices * nodes
    return None


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


def _hydra_config():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def in_multirun() -> bool:
    """True inside a Hydra multirun job (any sweeper, any launcher)."""
    from hydra.types import RunMode

    hydra_cfg = _hydra_config()
    return hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN


def validate_sweep(cfg: DictConfig, multirun: bool | None = None) -> None:
    """Refuse what no job of a sweep can do; called before the first job trains."""
    multirun = in_multirun() if multirun is None else multirun
    if not multirun:
        return
    if cfg.strategy.name == "ddp":
        raise ConfigError(
            "strategy=ddp cannot run inside a multirun (-m): it re-launches the whole command and so the sweep; "
            "use strategy=ddp_spawn, or one device per job (strategy=auto trainer.devices=1)."
        )
    hydra_cfg = _hydra_config()
    sweeper = hydra_cfg.sweeper if hydra_cfg is not None else {}
    direction = sweeper.get("direction") if "optuna" in str(sweeper.get("_target_", "")) else None
    metric = cfg.get("optimized_metric", "psnr")
    if isinstance(direction, str) and direction != OPTIMIZABLE.get(metric, direction):
        raise ConfigError(
            f"hydra.sweeper.direction={direction} with optimized_metric={metric} optimises the wrong way; "
            f"use hydra.sweeper.direction={OPTIMIZABLE[metric]}."
        )


def _needed_plugin(group: str, option: str) -> str | None:
    for prefix, (name, module) in SWEEP_PLUGINS.items():
        if group == prefix and option.startswith(name):
            return module
    return None


def check_sweep_extra(overrides: list[str]) -> None:
    """Name the optional extra when a command-line choice needs a Hydra plugin that is missing.

    Without this Hydra would only say that e.g. 'hydra/sweeper/optuna' is not in its search path.
    """
    needed = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        options = [v.strip() for v in value.split(",") if v.strip()]
        if key in SWEEP_PLUGINS:
            needed += [(override, _needed_plugin(key, v)) for v in options]
        elif key == "hparams_search":
            for option in options:
                path = resources.files("dvae.configs") / "hparams_search" / f"{option}.yaml"
                text = path.read_text() if path.is_file() else ""
                for line in text.splitlines():
                    group, _, choice = line.replace("override", "").strip(" -/").partition(":")
                    needed.append((override, _needed_plugin(group.strip().lstrip("/"), choice.strip())))
    for override, module in needed:
        if module is not None and importlib.util.find_spec(module) is None:
            package = module.split(".")[-1].replace("_", "-")
            raise ConfigError(
                f"{override} needs the {package} plugin, which is not installed; "
                "install the optional extra with pip install -e '.[sweep]' (from the dvae checkout)."
            )


def apply_scale_shorthand(cfg: DictConfig, overrides: list[str]) -> None:
    """`scale.value=V` on its own means a fixed scale V: with the default (learned) scale it
    switches to scale=constant, so `dvae-train -m scale.value=0.05,0.1` just works. Only an explicit
    `scale=learned` next to it is a contradiction, which `validate_config` reports."""
    if cfg.scale.mode != "learned" or cfg.scale.get("value") is None:
        return
    if any(o.strip().lstrip("~+") == "scale=learned" for o in overrides):
        return
    with open_dict(cfg):
        cfg.scale = {"mode": "constant", "value": cfg.scale.value}
    print(f"dvae-train: scale.value={cfg.scale.value} given, so the scale is fixed (scale=constant).",
          file=sys.stderr)


def _command_line_overrides() -> list[str]:
    try:
        return list(hydra.core.hydra_config.HydraConfig.get().overrides.task)
    except ValueError:  # not launched by Hydra (tests, notebooks)
        return []


def load_init_from(cfg: DictConfig):
    """`init_from=DIR` starts from an export directory (dvae-export, dvae-import-openai). Its
    architecture replaces the `model.*` keys, so the command line need not repeat it."""
    if not cfg.get("init_from"):
        return None
    from .model import DVAE, predicts_scale
    from .pretrained import architecture

    path = Path(str(cfg.init_from)).expanduser()
    if not (path / "dvae.json").is_file():
        raise ConfigError(f"init_from={path} is not an export directory (it has no dvae.json); pass a "
                          "directory written by dvae-export or dvae-import-openai.")
    pretrained = DVAE.from_pretrained(path)
    arch = architecture(pretrained)
    if arch["channels"] != cfg.data.channels:
        raise ConfigError(f"init_from={path} has {arch['channels']} channels but data={cfg.data.name} has "
                          f"{cfg.data.channels}; pick data with {arch['channels']} channels.")
    learned = predicts_scale(cfg.loss, cfg.scale.mode)
    if arch["learned_scale"] != learned:
        need = "scale=learned loss=logit_laplace" if arch["learned_scale"] else "a fixed scale or loss=l1/mse"
        raise ConfigError(f"init_from={path} was exported {'with' if arch['learned_scale'] else 'without'} a "
                          f"learned scale (its decoder's output differs); train it with {need}.")
    with open_dict(cfg):
        for key in ("n_hid", "blocks_per_group", "groups", "K", "n_init"):
            cfg.model[key] = arch[key]
    return pretrained


def build_module(cfg: DictConfig):
    """The LightningModule from the config: every hyper-parameter is a primitive."""
    from .lightning import DVAELightning
    from .model import DEFAULT_LOG_SCALE_FLOOR

    m, s = cfg.model, cfg.scale
    return DVAELightning(
        channels=int(cfg.data.channels), n_hid=m.n_hid, blocks_per_group=m.blocks_per_group,
        groups=m.groups, K=m.K, n_init=m.n_init, hard=m.hard, pixel_eps=cfg.pixel_eps,
        loss=cfg.loss, scale_mode=s.mode, scale_value=s.get("value") or 0.1,
        scale_start=s.get("start", 0.5), scale_end=s.get("end", 0.05),
        scale_steps=s.get("steps", 1000),
        log_scale_floor=DEFAULT_LOG_SCALE_FLOOR if s.get("log_floor") is None else s.log_floor,
        tau_start=cfg.temperature.start, tau_end=cfg.temperature.end, tau_steps=cfg.temperature.steps,
        beta_start=cfg.kl_weight.start, beta_end=cfg.kl_weight.end, beta_steps=cfg.kl_weight.steps,
        lr=cfg.optim.lr, lr_end=cfg.optim.lr_end, lr_warmup_steps=cfg.optim.warmup_steps,
        lr_steps=cfg.optim.steps, betas=tuple(cfg.optim.betas), adam_eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, ema_decay=cfg.ema.decay,
        max_bad_steps=cfg.guard.max_bad_steps,
        usage_weight=cfg.codebook.usage_weight, reseed_every=cfg.codebook.reseed_every,
        usage_window=cfg.codebook.window,
        compile_loss=bool(cfg.compile.loss), compile_model=bool(cfg.compile.model),
        channels_last=bool(cfg.channels_last),
    )


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


def build_trainer(cfg: DictConfig, run_dir: Path, loggers: list, callbacks: list) -> L.Trainer:
    """The Lightning Trainer: `trainer.*` as is, the strategy and precision; the data module splits the
    data over the ranks itself (global batch, no padded validation), so Lightning's sampler is off."""
    from .checkpointing import AtomicCheckpointIO

    plugins = [] if cfg.strategy.name in GPU_ONLY_STRATEGIES else [AtomicCheckpointIO()]
    strategy = cfg.strategy.name
    if strategy == "ddp" and cfg.strategy.get("cluster") == "slurm":
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        plugins.append(SLURMEnvironment(auto_requeue=bool(cfg.strategy.get("requeue", True))))
    if strategy in ("ddp", "ddp_spawn"):
        from lightning.pytorch.strategies import DDPStrategy

        # No buffer needs syncing (the only one is the EMA's update count, equal on every rank), and DDP's
        # per-forward buffer broadcast would pair up wrongly when ranks validate different numbers of batches.
        strategy = DDPStrategy(start_method="spawn" if strategy == "ddp_spawn" else "popen", broadcast_buffers=False)
    return L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        strategy=strategy, precision=str(cfg.precision), logger=loggers, plugins=plugins,
        callbacks=callbacks, default_root_dir=run_dir, enable_progress_bar=bool(cfg.progress_bar),
        use_distributed_sampler=False,
    )


def train(cfg: DictConfig, run_dir: str | Path | None = None, extra_callbacks: list | None = None) -> float:
    """Train one dVAE; returns the final validation value of `cfg.optimized_metric` (default psnr),
    what sweepers optimise (NaN where the run has no such value). `extra_callbacks` are added to the
    Trainer's (diagnostics such as scripts/trace_training.py)."""
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from .callbacks import CodebookMonitor, ReconstructionGrid
    from .checkpointing import Interrupted, RunCheckpoints
    from .data import build_datamodule
    from .resume import checkpoint_step, resolve_resume
    from .usage import run_verdict

    if run_dir is None:
        run_dir = hydra.core.hydra_config.HydraConfig.get().runtime.output_dir
    overrides = _command_line_overrides()
    cfg, run_dir, resume_from = resolve_resume(cfg, Path(run_dir), overrides)
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
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    if pretrained is not None:
        module.model.load_state_dict(pretrained.state_dict())
        module.ema.module.load_state_dict(pretrained.state_dict())
    resume_step = checkpoint_step(resume_from) if resume_from is not None else None
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
    callbacks = [best, last, grid, monitor, *(extra_callbacks or [])]
    if cfg.progress_bar and sys.stderr.isatty():
        callbacks.append(RichProgressBar())
    trainer = build_trainer(cfg, run_dir, loggers, callbacks)
    start = time.perf_counter()
    status = "failed"
    # Subnormal floats take a slow path on x86 CPUs: measured 3.1 s instead of 0.11 s per default training
    # step once they appear; flushing them to zero changes nothing above 1e-38. Process-wide, so it is
    # switched back off when training ends (callers in the same process get the IEEE default again).
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
        torch.set_flush_denormal(False)
        close_loggers(loggers, status)
    metrics = {
        "psnr": final["val/psnr"],
        "psnr_mean_color": final["val/psnr_mean_color"],
        "psnr_edges": final.get("val/psnr_edges"),
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
                                              float(cfg.codebook.collapse_below))
    bad_files = datamodule.bad_files()
    metrics["bad_files"] = len(bad_files)
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
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


@hydra.main(version_base="1.3", config_path="pkg://dvae.configs", config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    """One run, or one job of a sweep. A job that fails is recorded in its directory and re-raised:
    Hydra's launchers go on with the next job and the sweep exits non-zero at the end."""
    try:
        validate_sweep(cfg)
    except ConfigError as error:  # the same for every job: stop the sweep now
        print(f"dvae-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    if not in_multirun():
        try:
            return train(cfg)
        except ConfigError as error:
            print(f"dvae-train: error: {error}", file=sys.stderr)
            sys.exit(2)
        except RunStopped as error:
            print(f"dvae-train: {error}", file=sys.stderr)
            sys.exit(error.exit_code)
        except TrainingError as error:
            print(f"dvae-train: error: {error}", file=sys.stderr)
            sys.exit(1)
    job_dir = Path(_hydra_config().runtime.output_dir)
    try:
        value = train(cfg, job_dir)
    except Exception as error:
        if isinstance(error, ConfigError):
            print(f"dvae-train: error: {error}", file=sys.stderr)
        record_failure(job_dir, error)
        raise
    (job_dir / "status.json").write_text(json.dumps({"status": "finished"}, indent=2) + "\n")
    return value


def main() -> None:
    """`dvae-train`: checks the optional sweep plugins first, then hands over to Hydra."""
    try:
        check_sweep_extra(sys.argv[1:])
    except ConfigError as error:
        print(f"dvae-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
