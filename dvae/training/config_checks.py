"""Checks of a composed config before anything runs: every numeric key against its rule, the combinations
that cannot work, and what a sweep needs. Each refusal is one sentence naming the key."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from dataclasses import fields
from importlib import resources
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from dvae.errors import ConfigError
from dvae.losses import LOSSES
from dvae.schedules import KINDS, SCALE_MODES, SEED_SCALE
from dvae.training.hydra_run import hydra_config, in_multirun

PRECISIONS = ("32", "32-true", "64", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
GPU_ONLY_STRATEGIES = ("fsdp", "deepspeed", "deepspeed_stage_2", "deepspeed_stage_3")
# what `train` can return to a sweeper (`optimized_metric`), and which way is better
OPTIMIZABLE = {"psnr": "maximize", "psnr_edges": "maximize", "bits_per_dim": "minimize",
               "perplexity": "maximize", "codes_used_fraction": "maximize"}
# Hydra plugins behind the `sweep` extra: the config option they provide -> their module
SWEEP_PLUGINS = {"hydra/sweeper": ("optuna", "hydra_plugins.hydra_optuna_sweeper"),
                 "hydra/launcher": ("submitit", "hydra_plugins.hydra_submitit_launcher")}


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
    "trainer.accumulate_grad_batches": Rule(int, 1),
    "trainer.limit_train_batches": AnyOf(Rule(int, 0, none=True), Rule(float, 0, 1),
                                         need="a number of batches, or a fraction of the epoch (0 to 1)"),
    "trainer.limit_val_batches": AnyOf(Rule(int, 0, none=True), Rule(float, 0, 1),
                                       need="a number of batches, or a fraction of the validation set (0 to 1)"),
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
    "scale.value": Rule(float, 0, low_open=True, none=True,
                        hint=f"the Laplace scale b is positive (the seed used {SEED_SCALE})"),
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


# DVAEConfig fields that the config sets outside `model:`, because the data or the objective decides them
MODEL_FIELDS_SET_ELSEWHERE = {"channels": "data.channels", "eps": "pixel_eps", "log_scale_floor": "scale.log_floor",
                              "learned_scale": "scale (scale=learned, or a fixed or scheduled scale)"}


def check_model_keys(cfg: DictConfig) -> None:
    """Every `model.*` key is a DVAEConfig field: the whole section goes to the network as it is."""
    from dvae.model import DVAEConfig

    allowed = sorted({f.name for f in fields(DVAEConfig)} - MODEL_FIELDS_SET_ELSEWHERE.keys())
    for key in cfg.model:
        if key in MODEL_FIELDS_SET_ELSEWHERE:
            raise ConfigError(f"model.{key} is set by {MODEL_FIELDS_SET_ELSEWHERE[key]}; use that key instead.")
        if key not in allowed:
            raise ConfigError(f"model.{key} is not an option of the network; the model keys are {', '.join(allowed)}.")


def validate_config(cfg: DictConfig) -> None:
    """Refuse a run that cannot work, with one sentence naming the key, before any training."""
    check_rules(cfg)
    check_model_keys(cfg)
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
            raise ConfigError(
                f"scale=constant needs scale.value, the fixed Laplace scale b (the seed used {SEED_SCALE}).")
    elif mode in KINDS:
        for key in ("scale.start", "scale.end", "scale.steps"):
            if OmegaConf.select(cfg, key) is None:
                raise ConfigError(f"scale={mode} needs {key}.")
    else:
        raise ConfigError(f"scale.mode={mode} is not known; use scale={', '.join(SCALE_MODES)}.")
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
    max_time = cfg.trainer.get("max_time")
    as_mapping = isinstance(max_time, DictConfig) and set(max_time) <= {"days", "hours", "minutes", "seconds"} and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in max_time.values())
    if max_time is not None and not as_mapping and not re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", str(max_time)):
        raise ConfigError(f"trainer.max_time={max_time!r} must be DD:HH:MM:SS (e.g. trainer.max_time=00:01:30:00 for "
                          "an hour and a half) or a mapping of days, hours, minutes and seconds.")
    metric = cfg.get("optimized_metric", "psnr")
    if metric not in OPTIMIZABLE:
        raise ConfigError(f"optimized_metric={metric} is not known; use one of {', '.join(OPTIMIZABLE)}.")


def world_size(cfg: DictConfig) -> int | None:
    """Processes in the run when the config says (devices and num_nodes as integers), else None."""
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, int) and devices > 0 and isinstance(nodes, int) and nodes > 0:
        return devices * nodes
    return None


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
    hydra_cfg = hydra_config()
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
