"""A training checkpoint read with torch alone (weights_only=True: no code in it runs, and Lightning is not
imported), and written out as an export directory or as the official key names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dvae.errors import ConfigError
from dvae.files import atomic_write, load_weights
from dvae.model import DVAE, DVAEConfig
from dvae.pretrained import FORMATS, check_out_dir, file_sha256, save_pretrained
from dvae.schedules import SEED_SCALE, Schedule

WEIGHTS = {"ema": "ema.module.", "raw": "model."}
CHECKPOINTS = ("best", "last")


def resolve_checkpoint(source: str | Path, which: str | None = None, say: Callable[[str], Any] = print) -> Path:
    """A .ckpt file as given, or `checkpoints/{which}.ckpt` of a run directory (or of the checkpoints
    directory itself). best.ckpt is the best by validation PSNR, last.ckpt the latest. Without `which`,
    best.ckpt, or last.ckpt for a run that never validated, which `say` is told."""
    if which is not None and which not in CHECKPOINTS:
        raise ConfigError(f"--checkpoint {which} is not known; use best or last.")
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass a run directory of dvae-train or a .ckpt file.")
    if path.is_file():
        return path
    for name in (which,) if which else CHECKPOINTS:
        for candidate in (path / "checkpoints" / f"{name}.ckpt", path / f"{name}.ckpt"):
            if candidate.is_file():
                if name != "best" and which is None:
                    say(f"{path} has no best.ckpt (the run never validated); exporting {candidate}, the latest.")
                return candidate
    found = sorted(p.name for p in (path / "checkpoints").glob("*.ckpt")) + sorted(p.name for p in path.glob("*.ckpt"))
    hint = f" (it has {', '.join(found)}; pick one with --checkpoint or pass the file)" if found else ""
    wanted = f"checkpoints/{which}.ckpt" if which else "checkpoints/best.ckpt or last.ckpt"
    raise ConfigError(
        f"{path} has no {wanted}{hint}; pass a run directory written by dvae-train or a .ckpt file."
    )


def read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        checkpoint = load_weights(path)
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - torch raises many kinds on a damaged or foreign file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"{path} could not be read as a training checkpoint ({reason}); pass a .ckpt written by dvae-train."
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ConfigError(
            f"{path} is not a dvae-train checkpoint (no state_dict or hyper_parameters); pass a .ckpt written "
            f"by dvae-train."
        )
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any], weights: str = "ema", path: Path | None = None) -> DVAE:
    """The checkpoint's EMA (or raw) `DVAE`, in eval mode on the CPU."""
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights} is not known; use ema or raw.")
    prefix = WEIGHTS[weights]
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        other = "raw" if weights == "ema" else "ema"
        raise ConfigError(f"{path or 'the checkpoint'} holds no {weights} weights ({prefix}*); try --weights {other}.")
    try:
        model = DVAE(DVAEConfig.from_hparams(checkpoint["hyper_parameters"], state))
    except KeyError as error:
        raise ConfigError(
            f"{path or 'the checkpoint'} lacks the hyper-parameter {error.args[0]}; pass a .ckpt written by dvae-train."
        ) from error
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        names = [*result.missing_keys, *result.unexpected_keys][:6]
        raise ConfigError(
            f"{path or 'the checkpoint'}'s {weights} weights do not fit the model its hyper-parameters describe "
            f"({', '.join(names)}); pass a .ckpt written by this version of dvae-train."
        )
    return model.eval()


def run_config(checkpoint_path: Path) -> dict[str, Any]:
    """The run's config.yaml (next to checkpoints/), when there is one: the training crop size and data."""
    config = checkpoint_path.resolve().parent.parent / "config.yaml"
    if not config.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def scale_at(hp: dict[str, Any], step: int) -> float | None:
    """The scale b the model was trained with at `step` (the Laplace's, or for loss=mse the Gaussian's standard
    deviation); None when the decoder predicts it."""
    mode = hp.get("scale_mode", "learned")
    if mode == "learned":
        return None
    if mode == "constant":
        return float(hp.get("scale_value", SEED_SCALE))
    return float(Schedule(mode, hp["scale_start"], hp["scale_end"], hp["scale_steps"])(step))


def export(source: str | Path, out: str | Path, format: str = "safetensors", weights: str = "ema",
           checkpoint: str | None = None, force: bool = False, say: Callable[[str], Any] = print) -> Path:
    """Export a run directory's (or a .ckpt file's) model into `out`; returns `out`.
    `format="openai"` writes `encoder.pt` and `decoder.pt` instead: state dicts with the official
    key names, for `dall_e.Encoder` / `dall_e.Decoder`."""
    if format == "openai":
        return export_openai(source, out, weights, checkpoint, force, say)
    if format not in FORMATS:
        raise ConfigError(f"--format {format} is not known; use one of {', '.join(FORMATS)}.")
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights} is not known; use ema or raw.")
    path = resolve_checkpoint(source, checkpoint, say)
    out = Path(out)
    check_out_dir(out, force)  # before reading anything large
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, weights, path)
    hp = dict(ckpt["hyper_parameters"])
    run = run_config(path)
    data = run.get("data") if isinstance(run.get("data"), dict) else {}
    step = int(ckpt.get("global_step", 0))
    metadata = {
        "loss": hp.get("loss", "logit_laplace"),
        "scale_mode": hp.get("scale_mode", "learned"),
        "scale": scale_at(hp, step),
        "image_size": data.get("crop_size"),
        "training": {"step": step, "epoch": ckpt.get("epoch"), "weights": weights, "data": data.get("name"),
                     "ema_decay": hp.get("ema_decay")},
        "source": {"checkpoint": str(path.resolve()), "sha256": file_sha256(path),
                   "lightning_version": ckpt.get("pytorch-lightning_version")},
    }
    save_pretrained(model, out, format=format, force=force, metadata=metadata)
    return out


def export_openai(source: str | Path, out: str | Path, weights: str = "ema", checkpoint: str | None = None,
                  force: bool = False, say: Callable[[str], Any] = print) -> Path:
    from dvae.formats.openai import to_official

    path = resolve_checkpoint(source, checkpoint, say)
    out = Path(out)
    check_out_dir(out, force)
    model = model_from_checkpoint(read_checkpoint(path), weights, path)
    if model.groups != 4 or not model.learned_scale:
        raise ConfigError(f"{path} cannot be written in the official format: dall_e's modules have 4 groups and "
                          f"a learned scale, this model has {model.groups} groups and "
                          f"{'a learned' if model.learned_scale else 'a fixed'} scale.")
    out.mkdir(parents=True, exist_ok=True)
    for name, state in zip(("encoder.pt", "decoder.pt"), to_official(model)):
        atomic_write(out / name, lambda f, state=state: torch.save(state, f))
    return out
