"""The export format: a directory a `DVAE` can be rebuilt from with torch alone (no Hydra, no Lightning).

    dvae.json              everything needed to rebuild the model, and where it came from
    codebook.<ext>         `codebook`, [K, D]: the decoder's input projection, stored once
    model.<ext>            every other encoder.* and decoder.* tensor

<ext> is safetensors (default), npy (`codebook.npy` and `model.npz`) or pt (torch.save state dicts,
read back with weights_only=True). The model file does not hold `decoder.blocks.input.weight`: on load
that weight is the codebook file's tensor, transposed, so the exported codebook is the one the decoder
uses, and editing it changes what the decoder draws.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dvae.errors import ConfigError
from dvae.files import atomic_write, load_weights
from dvae.version import __version__

FORMAT_NAME = "dvae"
FORMAT_VERSION = 1
CONFIG_FILE = "dvae.json"
FORMATS = ("safetensors", "npy", "pt")
FILE_NAMES = {
    "safetensors": {"model": "model.safetensors", "codebook": "codebook.safetensors"},
    "npy": {"model": "model.npz", "codebook": "codebook.npy"},
    "pt": {"model": "model.pt", "codebook": "codebook.pt"},
}
CODEBOOK_KEY = "codebook"
# The decoder's input projection, [D, K, 1, 1]: exported only as the codebook, [K, D].
CODEBOOK_WEIGHT = "decoder.blocks.input.weight"
# Every file name an export may write: `--force` replaces or removes these and nothing else.
EXPORT_FILES = (CONFIG_FILE, *(name for names in FILE_NAMES.values() for name in names.values()))


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def check_out_dir(out: Path, force: bool, what: str = "--out") -> None:
    """Refuse to write into a non-empty directory unless `force`: nothing the user had is overwritten
    by accident. Called before any expensive work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {out} is a file, not a directory; choose a directory path.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(
            f"{what} {out} is not empty; choose a new directory, or pass --force to write into it (files of the "
            f"same names are replaced)."
        )
    existing = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if existing is not None and existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        # A read-only file system or a folder of someone else's: say so now, not after the work.
        raise ConfigError(f"{what} {out} cannot be written ({existing} is read-only to you); choose a directory "
                          f"you can write to.")


# --------------------------------------------------------------------------------------------- writing


def _write_tensors(path: Path, fmt: str, tensors: dict[str, Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if fmt == "safetensors":
        from safetensors.torch import save

        data = save(tensors, metadata={"format": "pt"})
        atomic_write(path, lambda f: f.write(data))
    elif fmt == "pt":
        atomic_write(path, lambda f: torch.save(tensors, f))
    elif path.suffix == ".npz":
        arrays = {k: v.numpy() for k, v in tensors.items()}
        atomic_write(path, lambda f: np.savez(f, **arrays))
    else:  # one .npy holds one tensor: the codebook
        (array,) = (v.numpy() for v in tensors.values())
        atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def save_pretrained(model: torch.nn.Module, out: str | Path, format: str = "safetensors", force: bool = False,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write `model` (a DVAE) as an export directory; `metadata` (training step, source checkpoint, ...) is
    merged into dvae.json. Returns dvae.json's path."""
    if format not in FORMATS:
        raise ConfigError(f"format {format!r} is not known; use one of {', '.join(FORMATS)}.")
    out = Path(out)
    check_out_dir(out, force)
    out.mkdir(parents=True, exist_ok=True)
    names = FILE_NAMES[format]
    state = model.state_dict()
    codebook = model.codebook.detach()
    tensors = {k: v for k, v in state.items() if k != CODEBOOK_WEIGHT}
    arch = model.config.to_dict()
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dvae_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "model": arch,
        "K": arch["K"],
        "D": arch["n_init"],
        "channels": arch["channels"],
        "downsampling": model.downsampling,
        "pixel_eps": arch["eps"],
        "learned_scale": arch["learned_scale"],
        **(metadata or {}),
        "tensor_format": format,
        "dtype": str(codebook.dtype).removeprefix("torch."),
        "files": dict(names),
    }
    previous = _previous_export_files(out)
    # A half-replaced directory must not look like a valid export: dvae.json goes first and comes last.
    (out / CONFIG_FILE).unlink(missing_ok=True)
    _write_tensors(out / names["codebook"], format, {CODEBOOK_KEY: codebook})
    _write_tensors(out / names["model"], format, tensors)
    for stale in previous - set(names.values()):  # the earlier export's files in another format
        (out / stale).unlink(missing_ok=True)
    write_json(out / CONFIG_FILE, config)
    return out / CONFIG_FILE


def _previous_export_files(out: Path) -> set[str]:
    """The tensor files the export already in `out` wrote, as its dvae.json lists them: the only files
    `--force` may remove (a user's own model.pt next to it is not ours). Names other than the ones an
    export writes are ignored."""
    try:
        files = json.loads((out / CONFIG_FILE).read_text()).get("files")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):  # none, or not an export's dvae.json
        return set()
    if not isinstance(files, dict):
        return set()
    return {name for name in files.values() if isinstance(name, str) and name in EXPORT_FILES} - {CONFIG_FILE}


# --------------------------------------------------------------------------------------------- reading


def read_config(path: str | Path) -> dict[str, Any]:
    """dvae.json of an export directory, checked enough that the model can be built from it."""
    path = Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file, not a directory"
        raise ConfigError(f"model directory {path} {what}; pass a directory written by dvae-export.")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ConfigError(
            f"{path} has no {CONFIG_FILE}, so it is not a complete dvae export; export the model again "
            f"with dvae-export (or DVAE.save_pretrained)."
        )
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{file} is not valid JSON ({error}); export the model again.") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise ConfigError(f"{file} is not a dvae export description; export the model again with dvae-export.")
    version = config.get("format_version", 0)
    if not isinstance(version, int):
        raise ConfigError(f"{file} has format version {version!r}, not a number; export the model again.")
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"{file} has format version {config['format_version']}, newer than this dvae "
            f"({__version__}) reads; upgrade dvae."
        )
    if config.get("tensor_format") not in FORMATS or not isinstance(config.get("files"), dict):
        raise ConfigError(f"{file} names no tensor format or files; export the model again.")
    for role, name in config["files"].items():
        # A bare name: '../x' or an absolute path would make dvae read (or hash) a file outside the export.
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ConfigError(f"{file} gives the {role} file as {name!r}, which is not a file name inside {path}; "
                              f"dvae reads only files in the export directory: export the model again.")
    if not isinstance(config.get("model"), dict):
        raise ConfigError(f"{file} has no 'model' section (the architecture); export the model again.")
    for key in ("K", "channels", "downsampling"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{file} has {key}={value!r}, not a positive integer; export the model again.")
    f, groups = config["downsampling"], config["model"].get("groups")
    groups = groups if isinstance(groups, int) and 1 <= groups <= 32 else None  # else DVAE(...) names it
    if f & (f - 1) or (groups and f != 2 ** (groups - 1)):  # one 2x2 pooling per group after the first
        expected = f"{2 ** (groups - 1)} for its {groups} groups" if groups else "a power of two"
        raise ConfigError(f"{file} has downsampling={f}, but it must be {expected}; export the model again.")
    return config


def _read_tensors(path: Path, fmt: str) -> dict[str, Tensor]:
    """All tensors of one file; any failure to parse it becomes one sentence naming the file."""
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing (dvae.json lists it); the export is incomplete: export the model again."
        )
    try:
        if fmt == "safetensors":
            from safetensors.torch import load

            return dict(load(path.read_bytes()))
        if fmt == "pt":
            data = load_weights(path)
            if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
                raise ValueError("it does not hold a dict of tensors")
            return data
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                return {k: torch.from_numpy(np.array(arrays[k])) for k in arrays.files}
        return {CODEBOOK_KEY: torch.from_numpy(np.load(path, allow_pickle=False))}
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - every reader fails differently on a damaged file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"{path} could not be read as {fmt} ({reason}): the file is truncated or corrupted; "
            f"export the model again."
        ) from error


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_state(path: Path, config: dict[str, Any], expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's state dict from the export files, with the codebook as the decoder's input weight.

    `expected` is a (meta-device) state dict of the model dvae.json describes; every missing,
    unexpected or wrongly shaped tensor is named in the error."""
    fmt, files = config["tensor_format"], config["files"]
    codebook_file = path / files.get("codebook", FILE_NAMES[fmt]["codebook"])
    model_file = path / files.get("model", FILE_NAMES[fmt]["model"])
    codebook_tensors = _read_tensors(codebook_file, fmt)
    state = _read_tensors(model_file, fmt)
    if CODEBOOK_KEY not in codebook_tensors:
        raise ConfigError(
            f"{codebook_file} holds no tensor named '{CODEBOOK_KEY}' (found: "
            f"{_listing(sorted(codebook_tensors)) or 'none'}); export the model again."
        )
    weight = expected[CODEBOOK_WEIGHT]
    K, D = weight.shape[1], weight.shape[0]
    codebook = codebook_tensors[CODEBOOK_KEY]
    if tuple(codebook.shape) != (K, D):
        raise ConfigError(
            f"{codebook_file}: 'codebook' has shape {list(codebook.shape)} but dvae.json describes "
            f"[K, D] = [{K}, {D}]; the files do not belong together: export the model again."
        )
    problems = []
    missing = sorted(set(expected) - set(state) - {CODEBOOK_WEIGHT})
    unexpected = sorted(set(state) - set(expected) | ({CODEBOOK_WEIGHT} & set(state)))
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    shapes = [f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if shapes:
        problems.append(f"mismatched shapes {_listing(shapes, 3)}")
    if problems:
        raise ConfigError(
            f"{model_file} does not match the model in dvae.json: {'; '.join(problems)}; "
            f"export the model again."
        )
    state[CODEBOOK_WEIGHT] = codebook.t().reshape(weight.shape).contiguous()
    bad = sorted(k for k, v in state.items() if not v.is_floating_point() or not torch.isfinite(v).all())
    if bad:
        raise ConfigError(
            f"{path} holds non-finite or non-float values in {_listing(bad)} (a damaged file, or a "
            f"diverged model); export a good checkpoint again."
        )
    return state


def fingerprint(path: str | Path) -> str:
    """SHA-256 over an export's architecture and tensor files: tokens made by different weights (an
    edited codebook included) never get mixed up."""
    path = Path(path)
    config = read_config(path)
    digest = hashlib.sha256(json.dumps(config["model"], sort_keys=True).encode())
    for role in sorted(config["files"]):
        digest.update(role.encode())
        digest.update(file_sha256(path / config["files"][role]).encode())
    return digest.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


