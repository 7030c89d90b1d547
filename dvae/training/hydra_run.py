"""What Hydra knows about this process: its config, whether this is a sweep job, the command line's overrides."""

from __future__ import annotations

import hydra


def hydra_config():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def in_multirun() -> bool:
    """True inside a Hydra multirun job (any sweeper, any launcher)."""
    from hydra.types import RunMode

    hydra_cfg = hydra_config()
    return hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN


def command_line_overrides() -> list[str]:
    try:
        return list(hydra.core.hydra_config.HydraConfig.get().overrides.task)
    except ValueError:  # not launched by Hydra (tests, notebooks)
        return []
