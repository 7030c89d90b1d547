"""`dvae-train`: the Hydra entry point. compose -> validate -> build -> fit -> metrics.json.

    dvae-train                                   # tiny model on the bundled photographs, CPU
    dvae-train scale=constant scale.value=0.2    # the seed's fixed scale
    dvae-train -m scale=constant scale.value=0.05,0.1,0.2
    dvae-train model=dalle data=folder data.root=/data/images trainer.devices=8 strategy=ddp
    dvae-train hparams_search=scale_optuna       # needs pip install -e '.[sweep]'
    dvae-train resume=outputs/2026-11-24/10-00-00  # continue a stopped run exactly where it stopped"""

from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from dvae.cli.exits import refuse
from dvae.errors import ConfigError, TrainingError
from dvae.training.config_checks import check_sweep_extra, validate_sweep
from dvae.training.hydra_run import hydra_config, in_multirun
from dvae.training.run import RunStopped, record_failure, train
from dvae.training.run_dir import check_new_run_dir, check_writable, hydra_files


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
    sys.exit(refuse("dvae-train", str(error)))


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
    job_dir = Path(hydra_config().runtime.output_dir)
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


def trainer_arguments() -> set[str]:
    import inspect

    from lightning import Trainer

    return set(inspect.signature(Trainer.__init__).parameters) - {"self"}


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
    elif key and key.startswith("trainer.") and key.removeprefix("trainer.") in trainer_arguments():
        sentence = (f"{key} is a Lightning Trainer argument that the config does not list; pass it with "
                    f"+{key}=VALUE (the + adds a key).")
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
