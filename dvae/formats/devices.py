"""Where encoding and decoding run: the device, whether a batch fits its memory, and the progress bar."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dvae.errors import ConfigError
from dvae.formats.tokens import first_shard


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ConfigError(f"--device {device} is not a device; use auto, cpu, cuda or cuda:N.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} needs a CUDA GPU and none is available; use --device cpu.")
    return resolved


def progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.1f} images/s" if speed else "- images/s")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                    disable=not enabled)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on `device`: the GPU's, or the machine's physical memory (psutil is not a
    dependency); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None


def bytes_per_image(config: dict[str, Any], pixels: int) -> int:
    """About the memory one image of `pixels` pixels takes through the model dvae.json describes, at
    its widest: a few float32 maps of the hidden width at full resolution, and the K logits (or the
    code vectors) per token. A little above the peak an encode or a decode reaches."""
    arch = config["model"]
    n_hid, n_init = (arch.get(key) for key in ("n_hid", "n_init"))
    if not all(isinstance(v, int) and v > 0 for v in (n_hid, n_init)):
        return 0  # DVAE.from_pretrained names the bad value
    tokens = pixels // config["downsampling"] ** 2
    return 4 * (pixels * 4 * (n_hid + config["channels"]) + tokens * (config["K"] + n_init))


def _amount(n: int) -> str:
    unit, scale = next(((u, f) for u, f in (("GB", 1e9), ("MB", 1e6)) if n >= f), ("kB", 1e3))
    return f"{n / scale:,.1f} {unit}"


def _memory_refusal(need: int, device: torch.device) -> str | None:
    """'but this machine has N GB' when `need` bytes exceed the device's memory, else None."""
    have = device_memory(device)
    if have is None or need <= have:
        return None
    return f"but {'the GPU' if device.type == 'cuda' else 'this machine'} has {_amount(have)}"


def check_encode_memory(config: dict[str, Any], size: int, what: str, batch: int, device: torch.device) -> None:
    """Refuse an image size or batch the device cannot hold, before the weights or an image are read:
    else the allocator fails (or the machine swaps) only after it has tried to take all memory."""
    per_image = bytes_per_image(config, size * size)
    if not per_image or not (short := _memory_refusal(per_image * batch, device)):
        return
    have = device_memory(device) or 0
    if per_image <= have:
        raise ConfigError(f"{what} with --batch-size {batch} needs about {_amount(per_image * batch)} of memory "
                          f"{short}; use --batch-size {have // per_image} or less.")
    f = config["downsampling"]
    largest = math.isqrt(have * size * size // per_image) // f * f
    fix = f"use --size {largest} or less" if largest >= f else "use a machine with more memory"
    raise ConfigError(f"{what} needs about {_amount(per_image)} of memory to encode one image {short}; {fix}.")


def check_decode_memory(tokens: Path, meta: dict[str, Any], config: dict[str, Any], device: torch.device,
                         batch: int, tiles: int, originals: bool) -> None:
    """Refuse token grids whose images the device cannot hold (a batch of them, and the contact sheet's
    tiles), before the weights are read."""
    if not batch:
        return
    grid = meta.get("grid")
    if not (isinstance(grid, list) and len(grid) == 2):
        grid = (np.load(tokens, mmap_mode="r") if tokens.is_file() else first_shard(tokens)).shape[-2:]
    f = config["downsampling"]
    height, width = int(grid[0]) * f, int(grid[1]) * f
    per_image = bytes_per_image(config, height * width)
    sheet = 2 * tiles * (2 if originals else 1) * config["channels"] * height * width  # uint8 tiles and the sheet
    short = _memory_refusal(per_image * batch + sheet, device)
    if not per_image or not short:
        return
    have = device_memory(device) or 0
    images = f"--tokens {tokens} holds {grid[0]}x{grid[1]} token grids ({height}x{width}-pixel images)"
    if sheet > have // 2:
        raise ConfigError(f"{images}: a contact sheet of {tiles} of them needs about {_amount(sheet)} of memory "
                          f"{short}; use a smaller --limit, or decode without --grid.")
    if per_image <= have:
        raise ConfigError(f"{images}: decoding {batch} at a time needs about {_amount(per_image * batch)} of memory "
                          f"{short}; use --batch-size {max(1, (have - sheet) // per_image)} or less.")
    raise ConfigError(f"{images}: decoding one needs about {_amount(per_image)} of memory {short}; decode them on a "
                      f"machine with more memory.")
