"""`dvae-train`: the Hydra entry point. compose -> validate -> build -> fit -> metrics.json.

    dvae-train                                   # tiny model on the bundled photographs, CPU
    dvae-train scale=constant scale.value=0.2    # the seed's fixed scale
    dvae-train -m scale=constant scale.value=0.05,0.1,0.2
    dvae-train model=dalle data=folder data.root=/data/images trainer.devices=8 strategy=ddp
    dvae-train hparams_search=scale_optuna       # needs pip install -e '.[sweep]'
    dvae-train resume=outputs/2026-11-24/10-00-00  # continue a stopped run exactly where it stopped
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import math
import os
import shutil
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
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException

from dvae.errors import ConfigError, TrainingError
from dvae.losses import LOSSES
from dvae.schedules import KINDS
from dvae.training.loggers import build_loggers, close_loggers, rank_zero

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


class Rule:
    """What a numeric key accepts: an integer (`int`) or any finite number (`float`), between `low` and
    `high` (inclusive unless `low_open` / `high_open`), or null where `none` (the feature is off)."""

    def __init__(self, kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False, none: bool = False, hint: str = ""):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.none, self.hint = none, hint

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    @property
    def need(self) -> str:
        text = "an integer" if self.kind is int else "a number"
        low, high = (f"{bound:g}" if isinstance(bound, float) else str(bound) for bound in (self.low, self.high))
        if self.low is not None and self.low == self.high:
            return low
        if self.low is not None and self.high is not None:
            text += f" in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text += f" {'>' if self.low_open else '>='} {low}"
        elif self.high is not None:
            text += f" {'<' if self.high_open else '<='} {high}"
        return text + (" or null" if self.none else "")


class AnyOf:
    """A key that takes several forms, e.g. an integer count or a fraction."""

    def __init__(self, *rules: Any, hint: str = "", need: str = ""):
        self.rules, self.hint, self._need = rules, hint, need

    def accepts(self, value: Any) -> bool:
        return any(rule.accepts(value) for rule in self.rules)

    @property
    def need(self) -> str:
        return self._need or " or ".join(rule.need for rule in self.rules)


class Words:
    """A string from a fixed set (`trainer.devices=auto`)."""

    hint = ""

    def __init__(self, *words: str):
        self.words = words

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.words

    @property
    def need(self) -> str:
        return " or ".join(repr(word) for word in self.words)


class NumberList:
    """A non-empty list (of `length` items where given) whose every item `item` accepts."""

    hint = ""

    def __init__(self, item: Rule, length: int | None = None):
        self.item, self.length = item, length

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, (ListConfig, list, tuple)) and len(value) >= 1
                and (self.length is None or len(value) == self.length) and all(self.item.accepts(v) for v in value))

    @property
    def need(self) -> str:
        return f"a list of {self.length or 'one or more'} items, each {self.item.need}"


# Every numeric key and what it accepts, checked first and in this order (trainer.max_steps before the
# schedules that take their length from it, so an error names the key the user typed). A key absent from
# the config (another data source's option) is skipped. A new numeric option is one line here.
RULES: dict[str, Any] = {
    "seed": Rule(int, 0, 2**32 - 1),
    "trainer.max_steps": Rule(int, 1),
    "trainer.max_epochs": Rule(int, -1, hint="-1 means no limit"),
    "trainer.val_check_interval": AnyOf(Rule(int, 1), Rule(float, 0, 1, low_open=True),
                                        hint="it counts updates, or a fraction of an epoch"),
    "trainer.check_val_every_n_epoch": Rule(int, 1, none=True),
    "trainer.devices": AnyOf(Rule(int, 1), Rule(int, -1, -1), Words("auto"), NumberList(Rule(int, 0)),
                             need="a number of devices, -1 (all), 'auto' or a list of device indices"),
    "trainer.num_nodes": Rule(int, 1),
    "trainer.log_every_n_steps": Rule(int, 1),
    "trainer.gradient_clip_val": Rule(float, 0, none=True),
    "trainer.num_sanity_val_steps": Rule(int, -1),
    "data.channels": Rule(int, 1, 4),
    "data.crop_size": Rule(int, 1),
    "data.batch_size": Rule(int, 1),
    "data.val_batch_size": Rule(int, 1, none=True),
    "data.num_workers": Rule(int, 0),
    "data.train_samples": Rule(int, 1),
    "data.val_samples": Rule(int, 1),
    "data.min_scale": Rule(float, 0, 1, low_open=True),
    "data.val_fraction": Rule(float, 0, 1, high_open=True),
    "data.shuffle_buffer": Rule(int, 1),
    "data.cache_mb": Rule(float, 0, hint="0 keeps no decoded images"),
    "model.n_hid": Rule(int, 1),
    "model.blocks_per_group": Rule(int, 1),
    "model.groups": Rule(int, 1, 16, hint="the downsampling factor is 2**(groups-1)"),
    "model.K": Rule(int, 2),
    "model.n_init": Rule(int, 1),
    "scale.value": Rule(float, 0, low_open=True, none=True, hint="the Laplace scale b is positive (the seed used 0.1)"),
    "scale.start": Rule(float, 0, low_open=True, hint="the Laplace scale b is positive"),
    "scale.end": Rule(float, 0, low_open=True, hint="the Laplace scale b is positive"),
    "scale.steps": Rule(int, 0),
    "scale.log_floor": Rule(float, none=True),
    "pixel_eps": Rule(float, 0, 0.5, high_open=True, hint="the paper uses 0.1"),
    "checkpoint.every_n_steps": Rule(int, 1),
    "guard.max_bad_steps": Rule(int, 1),
    "optim.lr": Rule(float, 0, low_open=True),
    "optim.lr_end": Rule(float, 0),
    "optim.warmup_steps": Rule(int, 0),
    "optim.steps": Rule(int, 0),
    "optim.betas": NumberList(Rule(float, 0, 1, high_open=True), length=2),
    "optim.eps": Rule(float, 0, low_open=True),
    "optim.weight_decay": Rule(float, 0),
    "temperature.start": Rule(float, 0, low_open=True, hint="the Gumbel-softmax temperature is positive"),
    "temperature.end": Rule(float, 0, low_open=True, hint="the Gumbel-softmax temperature is positive"),
    "temperature.steps": Rule(int, 0),
    "kl_weight.start": Rule(float, 0),
    "kl_weight.end": Rule(float, 0),
    "kl_weight.steps": Rule(int, 0),
    "ema.decay": Rule(float, 0, 1, high_open=True, hint="the paper uses 0.999"),
    "codebook.usage_weight": Rule(float, 0, hint="0 turns the batch-usage term off"),
    "codebook.entropy_weight": Rule(float, 0, hint="0 turns the entropy term off"),
    "codebook.reseed_every": Rule(int, 0, hint="0 turns re-seeding off"),
    "codebook.window": Rule(int, 1),
    "codebook.collapse_below": Rule(float, 0, 1, hint="it is a fraction of the codebook; 0 turns the warning off"),
}
_ABSENT = object()


def check_rules(cfg: DictConfig, rules: dict[str, Any] = RULES) -> None:
    """Refuse the first key whose value its rule does not accept, naming the key."""
    for key, rule in rules.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
            if value is _ABSENT or rule.accepts(value):
                continue
            shown = f"[{', '.join(map(repr, value))}]" if isinstance(value, ListConfig) else repr(value)
        except OmegaConfBaseException as error:  # e.g. an interpolation that does not resolve, or ???
            reason = str(error).splitlines()[0].rstrip(".")
            raise ConfigError(f"{key} has no usable value ({reason}); give it {rule.need}.") from None
        hint = f"; {rule.hint}" if rule.hint else ""
        raise ConfigError(f"{key}={shown} must be {rule.need}{hint}.")


def validate_config(cfg: DictConfig) -> None:
    """Refuse a run that cannot work, with one sentence naming the key, before any training."""
    check_rules(cfg)
    threads = cfg.get("threads", "auto")
    if threads != "auto" and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r} must be auto (a share of the cores among the dvae training processes "
                          "on this machine) or a whole number of at least 1.")
    if not isinstance(cfg.codebook.stop_on_collapse, bool):
        raise ConfigError(f"codebook.stop_on_collapse={cfg.codebook.stop_on_collapse!r} must be true or false.")
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
        if cfg.scale.get("value") is None:
            raise ConfigError("scale=constant needs scale.value, the fixed Laplace scale b (the seed used 0.1).")
    elif mode in KINDS:
        for key in ("scale.start", "scale.end", "scale.steps"):
            if OmegaConf.select(cfg, key) is None:
                raise ConfigError(f"scale={mode} needs {key}.")
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
    metric = cfg.get("optimized_metric", "psnr")
    if metric not in OPTIMIZABLE:
        raise ConfigError(f"optimized_metric={metric} is not known; use one of {', '.join(OPTIMIZABLE)}.")


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


class RunDirCheck(Callback):
    """A Hydra callback: checks hydra.run.dir (or hydra.sweep.dir) before Hydra creates it and writes its
    .hydra/ files there, so that a refused run changes nothing in a directory that is taken. Hydra turns a
    callback's exceptions into warnings, so a refusal exits here."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from dvae.training.resume import readable_step, resolve_resume

        run_dir = Path(str(config.hydra.run.dir))
        try:
            if config.get("resume"):  # the resume checks that train() repeats, before .hydra/ can land in the run
                _, _, checkpoint = resolve_resume(config, run_dir, list(config.hydra.overrides.task))
                if checkpoint is not None:
                    readable_step(checkpoint)
            else:
                check_new_run_dir(config, run_dir, hydra_files(config.hydra))
            check_writable(run_dir)
        except ConfigError as error:
            exit_with(error)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_writable(Path(str(config.hydra.sweep.dir)))
        except ConfigError as error:
            exit_with(error)


def exit_with(error: ConfigError) -> None:
    print(f"dvae-train: error: {error}", file=sys.stderr)
    sys.exit(2)


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
    from dvae.formats.pretrained import architecture
    from dvae.model import DVAE, predicts_scale

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
        need = "scale=learned" if arch["learned_scale"] else "a fixed or scheduled scale (scale=constant, cosine, ...)"
        raise ConfigError(f"init_from={path} was exported {'with' if arch['learned_scale'] else 'without'} a "
                          f"learned scale (its decoder's output differs); train it with {need}.")
    with open_dict(cfg):
        for key in ("n_hid", "blocks_per_group", "groups", "K", "n_init"):
            cfg.model[key] = arch[key]
    return pretrained


def build_module(cfg: DictConfig):
    """The LightningModule from the config: every hyper-parameter is a primitive."""
    from dvae.model import DEFAULT_LOG_SCALE_FLOOR
    from dvae.training.module import DVAELightning

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
        usage_window=cfg.codebook.window, entropy_weight=cfg.codebook.get("entropy_weight", 0.0),
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
    from dvae.training.checkpointing import AtomicCheckpointIO

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

    hydra_cfg = _hydra_config()
    if run_dir is None:
        run_dir = hydra_cfg.runtime.output_dir
    # Every check first, then the first write: a refused run leaves the run directory as it was.
    overrides = _command_line_overrides()
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
        bad_files = datamodule.take_bad_files()
        torch.set_flush_denormal(False)
        threads.release()
        torch.set_num_threads(threads_before)
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
                                              float(cfg.codebook.collapse_below), module.collapse_advice())
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
    Hydra's launchers go on with the next job and the sweep exits non-zero at the end. A job stopped by
    SIGTERM or Ctrl-C is recorded and exits: Hydra's launchers let SystemExit through, so the sweep stops."""
    try:
        validate_sweep(cfg)
    except ConfigError as error:  # the same for every job: stop the sweep now
        exit_with(error)
    if not in_multirun():
        try:
            return train(cfg)
        except ConfigError as error:
            exit_with(error)
        except RunStopped as error:
            print(f"dvae-train: {error}", file=sys.stderr)
            sys.exit(error.exit_code)
        except TrainingError as error:
            print(f"dvae-train: error: {error}", file=sys.stderr)
            sys.exit(1)
    job_dir = Path(_hydra_config().runtime.output_dir)
    try:
        value = train(cfg, job_dir)
    except RunStopped as error:  # SIGTERM or Ctrl-C stops the sweep, not only this job
        record_failure(job_dir, error)
        print(f"dvae-train: {error}; the sweep stops with this job.", file=sys.stderr)
        sys.exit(error.exit_code)
    except Exception as error:
        if isinstance(error, ConfigError):
            print(f"dvae-train: error: {error}", file=sys.stderr)
        record_failure(job_dir, error)
        raise
    (job_dir / "status.json").write_text(json.dumps({"status": "finished"}, indent=2) + "\n")
    return value


def _config_keys(overrides: list[str]) -> list[str]:
    """Every dotted key of the config composed with the command line's group choices (defaults if they fail)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    choices = [o for o in overrides if "=" in o and "." not in o.partition("=")[0] and not o.startswith(("-", "hydra"))]
    for attempt in (choices, []):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_module(config_module="dvae.configs", version_base="1.3"):
                cfg = compose(config_name="train", overrides=attempt)
            break
        except Exception:  # a bad choice among them: fall back to the defaults
            continue
    keys = []

    def walk(node: DictConfig, prefix: str) -> None:
        for key, value in node.items_ex(resolve=False):
            keys.append(f"{prefix}{key}")
            if isinstance(value, DictConfig):
                walk(value, f"{prefix}{key}.")

    walk(cfg, "")
    return keys


def hydra_error(error: Exception, overrides: list[str]) -> str:
    """Hydra's own message for a command line it could not compose, and a sentence with the nearest fix."""
    from hydra.errors import MissingConfigException

    text = str(error)
    if isinstance(error.__cause__, OmegaConfBaseException):
        text += "\n" + str(error.__cause__)
    key = getattr(error.__cause__, "full_key", None)
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        options = list(error.options or [])
        near = difflib.get_close_matches(option, options, n=1)
        advice = (f"did you mean {group}={near[0]}?" if near else f"use one of {', '.join(options)}." if options
                  else "dvae-train --help lists the groups and their options.")
        sentence = f"{group}={option} is not an option of {group}; {advice}"
    elif key:
        near = difflib.get_close_matches(key, _config_keys(overrides), n=1, cutoff=0.6)
        advice = (f"did you mean {near[0]}?" if near
                  else "dvae-train --cfg job lists every key.")
        sentence = f"{key} is not a key of the config; {advice}"
    else:
        sentence = "the command line was not understood (see above); dvae-train --help shows the syntax."
    return f"{text.rstrip()}\ndvae-train: error: {sentence}"


def main() -> None:
    """`dvae-train`: checks the optional sweep plugins first, then hands over to Hydra. Hydra's errors (an
    unknown key or option) are raised to here instead of printed by Hydra, so that they exit with status 2."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    overrides = sys.argv[1:]
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        check_sweep_extra(overrides)
        hydra_main()
    except ConfigError as error:  # check_sweep_extra, or RunDirCheck before Hydra writes the run directory
        exit_with(error)
    except (ConfigCompositionException, OverrideParseException) as error:
        print(hydra_error(error, overrides), file=sys.stderr)
        sys.exit(2)
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error


if __name__ == "__main__":
    main()
