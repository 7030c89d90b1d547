"""The objects of a run from its config: the LightningModule (optionally from an export) and the Trainer."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from dvae.errors import ConfigError
from dvae.schedules import SEED_SCALE
from dvae.training.config_checks import GPU_ONLY_STRATEGIES


def load_init_from(cfg: DictConfig):
    """`init_from=DIR` starts from an export directory (dvae-export, dvae-import-openai). Its
    architecture replaces the `model.*` keys, so the command line need not repeat it."""
    if not cfg.get("init_from"):
        return None
    from dvae.model import DVAE, predicts_scale

    path = Path(str(cfg.init_from)).expanduser()
    if not (path / "dvae.json").is_file():
        raise ConfigError(f"init_from={path} is not an export directory (it has no dvae.json); pass a "
                          "directory written by dvae-export or dvae-import-openai.")
    pretrained = DVAE.from_pretrained(path)
    arch = pretrained.config.to_dict()
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

    s = cfg.scale
    return DVAELightning(
        **OmegaConf.to_container(cfg.model, resolve=True), channels=int(cfg.data.channels), pixel_eps=cfg.pixel_eps,
        loss=cfg.loss, scale_mode=s.mode, scale_value=s.get("value") or SEED_SCALE,
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
