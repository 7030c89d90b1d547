"""`dvae-encode` and `dvae-decode`: images -> token grids on disk -> images, with an exported model.

    dvae-encode --model exports/tiny --data photos/ --out tokens/        # any tree of image files
    dvae-encode --model exports/tiny --data shapes --split val --out tokens/   # a data config
    dvae-decode --model exports/tiny --tokens tokens/ --out decoded/ [--grid]

A TOKENS directory holds:

    shard_00000.npy ...   [N, h, w] token grids (uint16 when K <= 65536), `--shard-size` images each
    index.jsonl           one line per image: {"i", "shard", "row", "source"} (the source file's path
                          relative to the image folder, or NAME/SPLIT/INDEX for a data config)
    meta.json             the model's fingerprint, K, grid size, image size and the data it came from

Each shard is written whole (temporary file + rename) before its index lines are appended, so a run
that stops leaves only complete shards, and the same command continues from the first missing one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from dvae.data.common import center_crop, resize, to_unit_float
from dvae.data.folder import IMAGE_EXTENSIONS, read_rgb, walk_images
from dvae.errors import ConfigError, os_error_sentence
from dvae.formats.pretrained import atomic_write, check_out_dir, fingerprint, from_pretrained, read_config, write_json

SHARD_NAME = "shard_{:05d}.npy"
INDEX_FILE = "index.jsonl"
META_FILE = "meta.json"
CONTACT_SHEET = "contact_sheet.png"
DATA_CONFIGS = ("photos", "shapes", "mnist", "cifar10")
GREY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma, for 1-channel models


# --------------------------------------------------------------------------------------------- images


def token_dtype(K: int) -> np.dtype:
    """The smallest unsigned type that holds every token: uint16 for K <= 65536."""
    return np.dtype(np.uint16) if K <= 2**16 else np.dtype(np.uint32)


def prepare_image(image: Tensor, size: int, channels: int = 3) -> Tensor:
    """uint8 [3, H, W] -> float [channels, size, size] in [0, 1]: the shorter side resized to `size`
    (antialiased bilinear), then the centre square. What dvae-encode feeds the model."""
    _, height, width = image.shape
    scale = size / min(height, width)
    image = resize(image, max(size, round(height * scale)), max(size, round(width * scale)))
    x = to_unit_float(center_crop(image, size))
    if channels == 1 and x.shape[0] == 3:  # the weights sum to 1 only up to rounding: clamp
        x = (x * GREY[:, None, None]).sum(dim=0, keepdim=True).clamp_(0.0, 1.0)
    return x


def load_image(path: str | Path, size: int, channels: int = 3) -> Tensor:
    """An image file as dvae-encode sees it: float [channels, size, size] in [0, 1]."""
    return prepare_image(read_rgb(Path(path)), size, channels)


def to_uint8(images: Tensor) -> Tensor:
    """Images in [0, 1] -> uint8, round(255 x): the values the PNGs of dvae-decode hold."""
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def save_png(image: Tensor, path: Path) -> None:
    """uint8 or [0, 1] float [C, H, W] -> an 8-bit PNG, written atomically."""
    from PIL import Image

    if image.is_floating_point():
        image = to_uint8(image)
    array = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: picture.save(f, format="PNG", optimize=True))


class FolderImages(Dataset[Tensor]):
    """Every image file under a folder, in sorted order, prepared by `load_image`."""

    def __init__(self, paths: list[Path], size: int, channels: int):
        self.paths, self.size, self.channels = paths, size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return load_image(self.paths[index], self.size, self.channels)


def _parse_options(options: list[str]) -> dict[str, Any]:
    import yaml

    parsed = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--data-option {option!r} is not KEY=VALUE; write e.g. --data-option root=/data/mnist.")
        parsed[key.strip().removeprefix("data.")] = yaml.safe_load(value)
    return parsed


def open_images(data: str, size: int, channels: int, split: str = "val",
                options: list[str] | dict[str, Any] = ()) -> tuple[Dataset, list[str], dict[str, Any]]:
    """(dataset of [C, size, size] images, one source name per image, a description for meta.json).

    `data` is an image folder, a data config name (photos, shapes, mnist, cifar10, folder) or a
    data config .yaml file; a config's `split` (val or train) is read through `build_datamodule`."""
    path = Path(data).expanduser()
    if path.is_dir():
        paths, seen = walk_images(path)
        if not paths:
            raise ConfigError(
                f"--data {data} contains no image files ({seen} files seen; accepted: "
                f"{', '.join(IMAGE_EXTENSIONS)}); pass a folder of images or a data config name."
            )
        sources = [p.relative_to(path).as_posix() for p in paths]
        return FolderImages(paths, size, channels), sources, {"kind": "folder", "root": str(path.resolve())}
    if data == "folder":
        raise ConfigError("--data folder: pass the image directory itself, e.g. --data /data/images.")
    if split not in ("val", "train"):
        raise ConfigError(f"--split {split} is not known; use val or train.")
    if path.suffix in (".yaml", ".yml") and path.is_file():
        config_file, name = path, path.stem
    elif data in DATA_CONFIGS:
        config_file, name = files("dvae.configs") / "data" / f"{data}.yaml", data
    else:
        raise ConfigError(
            f"--data {data} is neither a folder of images nor a data config; pass a directory or one of "
            f"{', '.join(DATA_CONFIGS)}."
        )
    import yaml

    from dvae.data import build_datamodule

    try:
        cfg = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--data {data} is not valid YAML ({str(error).splitlines()[0]}); pass a data config "
                          f"file like dvae/configs/data/folder.yaml.") from error
    if not isinstance(cfg, dict):
        raise ConfigError(f"--data {data} does not hold a data config (a mapping of data.* keys); pass a file "
                          f"like dvae/configs/data/folder.yaml, or a folder of images.")
    opts = options if isinstance(options, dict) else _parse_options(list(options))
    cfg.update(opts)
    cfg["crop_size"] = size
    datamodule = build_datamodule(cfg, seed=int(cfg.get("seed") or 0))
    dataset = datamodule.val_set if split == "val" else datamodule.train_set
    if datamodule.channels != channels:
        raise ConfigError(
            f"--data {data} has {datamodule.channels}-channel images but the model reads {channels}; "
            f"use a model trained on this kind of data."
        )
    label = cfg.get("name", name)
    sources = [f"{label}/{split}/{i:06d}" for i in range(len(dataset))]
    spec = {"kind": "config", "name": str(data if path.suffix in (".yaml", ".yml") else name),
            "split": split, "options": opts}
    return dataset, sources, spec


def _image_size(config: dict[str, Any], size: int | None, model_dir: Path) -> int:
    """--size, or the training crop size of dvae.json: a positive multiple of the downsampling factor
    (a power of two: `read_config` checks it). A bad value is named where it came from."""
    f = config["downsampling"]
    given = size
    if size is None:
        size = config.get("image_size")
        if size is None:
            raise ConfigError(f"{model_dir}/dvae.json records no training image size; pass --size (a multiple of {f}).")
    if isinstance(size, int) and not isinstance(size, bool) and size >= f and size % f == 0:
        return size
    number = size if isinstance(size, (int, float)) and not isinstance(size, bool) and math.isfinite(size) else 8 * f
    suggestion = max(f, round(number / f) * f)
    if given is None:
        raise ConfigError(
            f"{model_dir}/dvae.json has image_size={size!r}, not a positive multiple of the model's downsampling "
            f"factor {f}; pass --size (e.g. --size {suggestion}) or export the model again."
        )
    raise ConfigError(
        f"--size {size} is not a positive multiple of the model's downsampling factor {f}; "
        f"use e.g. --size {suggestion}."
    )


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


def _progress(enabled: bool):
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


# --------------------------------------------------------------------------------------------- memory


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
        return 0  # from_pretrained names the bad value
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


def _check_encode_memory(config: dict[str, Any], size: int, what: str, batch: int, device: torch.device) -> None:
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


def _check_decode_memory(tokens: Path, meta: dict[str, Any], config: dict[str, Any], device: torch.device,
                         batch: int, tiles: int, originals: bool) -> None:
    """Refuse token grids whose images the device cannot hold (a batch of them, and the contact sheet's
    tiles), before the weights are read."""
    if not batch:
        return
    grid = meta.get("grid")
    if not (isinstance(grid, list) and len(grid) == 2):
        grid = (np.load(tokens, mmap_mode="r") if tokens.is_file() else _first_shard(tokens)).shape[-2:]
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


def _first_shard(tokens: Path) -> np.ndarray:
    records = _read_index(tokens, strict=True)
    return np.load(tokens / SHARD_NAME.format(records[0]["shard"] if records else 0), mmap_mode="r")


# --------------------------------------------------------------------------------------------- encode


def _index_problem(record: Any) -> str | None:
    """What is wrong with one parsed index line, or None: it needs integer i, shard and row of at
    least 0 (a row of -1 would quietly pick another grid) and a source name."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key in ("i", "shard", "row"):
        value = record.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{key}={_short(value)}, not an integer of at least 0"
    if not isinstance(record.get("source"), str):
        return f"source={_short(record.get('source'))}, not a file name"
    return None


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_index(out: Path, strict: bool = False) -> list[dict[str, Any]]:
    """The index lines up to the first broken one (a run stopped while appending). `strict` (reading
    the tokens back) refuses a broken line with a sentence naming the file and the line, unless it
    is a torn last line (no newline: an append that was cut short)."""
    records = []
    index = out / INDEX_FILE
    if not index.exists():
        return records
    try:
        text = index.read_text()
    except UnicodeDecodeError as error:
        if strict:
            raise ConfigError(f"{index} is not text ({error.reason}); the directory is damaged: run dvae-encode "
                              f"again into a new --out.") from error
        return records
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
            problem = "not JSON"
        else:
            problem = _index_problem(record)
        if problem:
            torn = number == len(lines) and not text.endswith("\n")
            if strict and not torn:
                raise ConfigError(f"{index} line {number} is damaged ({problem}); run dvae-encode again into a "
                                  f"new --out to redo the tokens.")
            break
        records.append(record)
    return records


def _completed(out: Path) -> tuple[int, int]:
    """(images, shards) in complete shards: the shard file on disk and every one of its index lines.
    Leftovers of an interrupted run after them (a torn index line, a shard without its index lines)
    are removed, so that the run continues right after the last complete shard."""
    records = _read_index(out)
    done = shard = 0
    while (out / SHARD_NAME.format(shard)).is_file():
        try:
            n = np.load(out / SHARD_NAME.format(shard), mmap_mode="r", allow_pickle=False).shape[0]
        except (OSError, ValueError):
            break
        block = records[done:done + n]
        if len(block) != n or any(r["shard"] != shard or r["row"] != k or r["i"] != done + k
                                  for k, r in enumerate(block)):
            break
        done, shard = done + n, shard + 1
    index = out / INDEX_FILE
    if index.exists() and len([line for line in index.read_text().splitlines() if line.strip()]) != done:
        text = "".join(json.dumps(r) + "\n" for r in records[:done])
        atomic_write(index, lambda f: f.write(text.encode()))
    for partial in out.glob(".shard_*.tmp"):  # a shard being written when the run was killed
        partial.unlink()
    for stale in out.glob("shard_*.npy"):
        if not stale.stem.split("_")[-1].isdigit() or int(stale.stem.split("_")[-1]) >= shard:
            stale.unlink()
    return done, shard


def _clear(out: Path) -> None:
    """Remove what an earlier dvae-encode wrote in `out` (and nothing else)."""
    for path in [*out.glob("shard_*.npy"), *out.glob(".shard_*.tmp"), out / INDEX_FILE, out / META_FILE]:
        path.unlink(missing_ok=True)


def encode_dataset(model_dir: str | Path, data: str, out: str | Path, size: int | None = None,
                   split: str = "val", batch_size: int = 64, shard_size: int = 1024, device: str = "auto",
                   workers: int = 0, force: bool = False, data_options: list[str] | dict[str, Any] = (),
                   progress: bool = True) -> dict[str, Any]:
    """Encode every image of `data` into token shards under `out`, continuing an interrupted run.

    Returns the final meta.json."""
    model_dir, out = Path(model_dir), Path(out)
    for name, value, least in (("--batch-size", batch_size, 1), ("--shard-size", shard_size, 1),
                               ("--workers", workers, 0)):
        if not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} {value} must be an integer of at least {least}.")
    if not (out / META_FILE).is_file():
        check_out_dir(out, force)  # a folder of something else: refuse before any work
    dev = resolve_device(device)
    config = read_config(model_dir)  # dvae.json alone: the weights are read once everything else is known good
    given_size, size = size, _image_size(config, size, model_dir)
    dataset, sources, spec = open_images(data, size, config["channels"], split, data_options)
    _check_encode_memory(config, size, f"--size {size}" if given_size is not None else
                         f"image_size {size} of {model_dir / 'dvae.json'}", min(batch_size, len(sources)), dev)
    K, f = config["K"], config["downsampling"]
    meta = {
        "model": {"path": str(model_dir.resolve()), "fingerprint": fingerprint(model_dir), "K": K,
                  "downsampling": f, "checkpoint_sha256": (config.get("source") or {}).get("sha256")},
        "image_size": size,
        "grid": [size // f, size // f],
        "dtype": token_dtype(K).name,
        "shard_size": shard_size,
        "data": spec,
        "num_images": len(sources),
        "sources_sha256": hashlib.sha256("\n".join(sources).encode()).hexdigest(),
    }
    done = shard = 0
    continuing = (out / META_FILE).is_file() and not force
    if continuing:
        try:
            previous = json.loads((out / META_FILE).read_text())
        except json.JSONDecodeError:
            previous = {}
        differs = [key for key in meta if _comparable(previous.get(key), key) != _comparable(meta[key], key)]
        if differs:
            raise ConfigError(
                f"--out {out} holds tokens made with a different {', '.join(differs)}; to continue it, repeat "
                f"the earlier command exactly, else pass a new --out, or --force to start over there."
            )
    model = from_pretrained(model_dir, device=dev)[0]
    if continuing:
        done, shard = _completed(out)
    else:
        check_out_dir(out, force)
        out.mkdir(parents=True, exist_ok=True)
        _clear(out)
        write_json(out / META_FILE, {**meta, "complete": False})
    total = len(sources)
    start = time.perf_counter()
    if done < total:
        if done:
            print(f"dvae-encode: continuing after {done} of {total} images already in {out}", file=sys.stderr)
        loader = DataLoader(Subset(dataset, range(done, total)), batch_size=batch_size, num_workers=workers)
        pending: list[np.ndarray] = []
        position = done
        dtype = token_dtype(K)
        with _progress(progress) as bar, torch.inference_mode():
            task = bar.add_task("encoding", total=total, completed=done)
            for images in loader:
                try:
                    tokens = model.encode(images.to(dev, non_blocking=True)).cpu().numpy().astype(dtype)
                except ValueError as error:
                    first = position + sum(len(t) for t in pending)  # the batch's first image
                    raise ConfigError(f"--data {data}, images {sources[first]} and after: {error}") from error
                pending.append(tokens)
                bar.advance(task, len(tokens))
                buffered = sum(len(t) for t in pending)
                while buffered >= shard_size or (buffered and position + buffered == total):
                    block = np.concatenate(pending)
                    n = min(shard_size, len(block))
                    _write_shard(out, shard, block[:n], sources[position:position + n], position)
                    pending = [block[n:]] if n < len(block) else []
                    position, shard, buffered = position + n, shard + 1, len(block) - n
    elapsed = time.perf_counter() - start
    meta = {**meta, "complete": True}
    write_json(out / META_FILE, meta)
    encoded = total - done
    rate = f", {encoded / elapsed:,.1f} images/s" if encoded and elapsed > 0 else ""
    print(f"dvae-encode: {total} token grids of {meta['grid'][0]}x{meta['grid'][1]} in {out} "
          f"({encoded} encoded now in {elapsed:.1f} s{rate})", file=sys.stderr)
    return meta


def _comparable(value: Any, key: str) -> Any:
    """meta.json values that must match to continue a run (the export may have moved: not its path)."""
    if key == "model" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "path"}
    return value


def _write_shard(out: Path, shard: int, tokens: np.ndarray, sources: list[str], first: int) -> None:
    """The shard file first (atomically), then its index lines: an index line is never ahead of its data."""
    atomic_write(out / SHARD_NAME.format(shard), lambda f: np.save(f, tokens, allow_pickle=False))
    lines = "".join(json.dumps({"i": first + row, "shard": shard, "row": row, "source": source}) + "\n"
                    for row, source in enumerate(sources))
    with open(out / INDEX_FILE, "a") as index:
        index.write(lines)
        index.flush()


# --------------------------------------------------------------------------------------------- reading


def _load_npy(path: Path) -> np.ndarray:
    """One array from a .npy file, or a ConfigError naming what the file is instead."""
    try:
        tokens = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--tokens {path} could not be read as a .npy file ({reason}); pass a .npy file of "
                          f"[N, h, w] token grids or a directory written by dvae-encode.") from error
    if not isinstance(tokens, np.ndarray):  # np.load opens a .npz archive instead
        tokens.close()
        raise ConfigError(f"--tokens {path} is a .npz archive, not a .npy array; save the token grids with np.save, "
                          f"or pass a directory written by dvae-encode.")
    return tokens


def check_grid_shape(shape: tuple[int, ...], where: str, grid: list[int] | None = None) -> None:
    """Refuse [N, h, w] token grids of no cells, or other than the grid meta.json records."""
    if 0 in shape[1:]:
        raise ConfigError(f"{where} holds empty token grids (shape {list(shape)}); each grid needs h, w >= 1.")
    if grid is not None and list(shape[1:]) != list(grid):
        raise ConfigError(f"{where} holds {shape[1]}x{shape[2]} token grids but its meta.json says "
                          f"{grid[0]}x{grid[1]}; the directory is damaged: run dvae-encode again.")


def check_token_grids(tokens: np.ndarray, K: int, where: str, grid: list[int] | None = None) -> None:
    """Refuse token grids the model cannot decode, before any of them is: a wrong grid shape
    (`check_grid_shape`) or values outside [0, K)."""
    check_grid_shape(tokens.shape, where, grid)
    if tokens.size:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= K:
            raise ConfigError(f"{where} holds token values in [{low}, {high}] but the model has K={K} codes "
                              f"(values 0 to {K - 1}); decode them with the model that made them.")


def _tokens_meta(tokens: Path) -> dict[str, Any]:
    """meta.json of a TOKENS directory ({} for a .npy file or a directory without one)."""
    file = tokens / META_FILE
    if not file.is_file():
        return {}
    try:
        meta = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{file} is not valid JSON ({error}); run dvae-encode again.") from error
    if not isinstance(meta, dict):
        raise ConfigError(f"{file} is not a dvae-encode description; run dvae-encode again.")
    return meta


def check_tokens_fit_model(tokens: Path, config: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """The TOKENS directory's meta.json ({} for a .npy file), after the checks that need no weights:
    the tokens were made with as many codes as `--model` has (else they decode into nonsense, or fail
    half-way), every shard holds the grid meta.json records, and a .npy file's values are in [0, K)."""
    meta = _tokens_meta(tokens)
    made_with = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    K = made_with.get("K")
    if K is not None and K != config["K"]:
        raise ConfigError(
            f"--tokens {tokens} were made by a model with K={K} codes ({made_with.get('path', 'see meta.json')}) "
            f"but --model {model_dir} has K={config['K']}; decode them with the model that made them."
        )
    if tokens.is_file():
        check_token_grids(next(iter_tokens(tokens))[0], config["K"], f"--tokens {tokens}")
        return meta
    _require_index(tokens)
    for shard, records in sorted(_by_shard(_read_index(tokens, strict=True)).items()):
        file = tokens / SHARD_NAME.format(shard)
        try:
            shape = np.load(file, mmap_mode="r", allow_pickle=False).shape  # the header only
        except (OSError, ValueError) as error:
            raise ConfigError(f"{file} could not be read ({error}); run dvae-encode again with the same "
                              f"arguments to redo it.") from error
        check_grid_shape(shape, f"--tokens {tokens}", meta.get("grid"))
        _check_rows(file, shape[0], records)
    return meta


def _by_shard(records: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        by_shard.setdefault(record["shard"], []).append(record)
    return by_shard


def _check_rows(shard_file: Path, n: int, records: list[dict[str, Any]]) -> None:
    """Every index line of a shard points at one of its `n` grids."""
    beyond = next((r for r in records if r["row"] >= n), None)
    if beyond is not None:
        raise ConfigError(f"{shard_file.parent / INDEX_FILE} is damaged: the line of {beyond['source']} points at "
                          f"row {beyond['row']} of {shard_file.name}, which holds {n} grids; run dvae-encode again "
                          f"into a new --out.")


def _require_index(path: Path) -> None:
    if not (path / INDEX_FILE).is_file():
        raise ConfigError(
            f"--tokens {path} has no {INDEX_FILE}; pass a directory written by dvae-encode or a .npy file."
        )


def iter_tokens(path: str | Path) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """(tokens [n, h, w], index records) per shard of a TOKENS directory, or once for a .npy file
    of [N, h, w] (or one [h, w]) token grids."""
    path = Path(path)
    if path.is_file():
        tokens = _load_npy(path)
        tokens = tokens[None] if tokens.ndim == 2 else tokens
        if tokens.ndim != 3 or not np.issubdtype(tokens.dtype, np.integer):
            raise ConfigError(
                f"--tokens {path} holds a {tokens.dtype} array of shape {list(tokens.shape)}; it must hold "
                f"integer token grids [N, h, w]."
            )
        yield tokens, [{"i": i, "source": f"{i:06d}"} for i in range(len(tokens))]
        return
    _require_index(path)
    for shard, rows in sorted(_by_shard(_read_index(path, strict=True)).items()):
        file = path / SHARD_NAME.format(shard)
        try:
            tokens = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"{file} could not be read ({error}); run dvae-encode again with the same arguments to redo it."
            ) from error
        _check_rows(file, len(tokens), rows)
        yield tokens[[r["row"] for r in rows]], rows


def count_tokens(path: str | Path) -> int:
    """How many token grids `iter_tokens` yields, without reading them."""
    path = Path(path)
    if path.is_file():
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError, AttributeError):  # AttributeError: a .npz archive has no shape
            return 0  # iter_tokens says what is wrong
        return 1 if len(shape) == 2 else (shape[0] if shape else 0)
    return len(_read_index(path, strict=True)) if (path / INDEX_FILE).is_file() else 0


def load_tokens(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """All token grids of a TOKENS directory (or .npy file) as one [N, h, w] array, and the source of
    each: what a transformer trains on."""
    arrays, sources = [], []
    for tokens, records in iter_tokens(path):
        arrays.append(tokens)
        sources += [r["source"] for r in records]
    if not arrays:
        raise ConfigError(f"--tokens {path} holds no token grids yet; run dvae-encode first.")
    return np.concatenate(arrays), sources


# --------------------------------------------------------------------------------------------- decode


def _png_name(source: str, i: int, taken: set[str]) -> str:
    """The decoded image's path under --out: the source's relative path with .png (or the index)."""
    candidate = Path(source)
    if candidate.is_absolute() or ".." in candidate.parts or not candidate.name:
        name = f"{i:06d}.png"
    else:
        name = candidate.with_suffix(".png").as_posix() if candidate.suffix else f"{candidate.as_posix()}.png"
    if name in taken:
        name = f"{name[:-4]}_{i}.png"
    taken.add(name)
    return name


def _originals(tokens_dir: Path, channels: int, shown: list[dict[str, Any]]) -> Callable[[dict[str, Any]], Tensor]:
    """The source image of an index line, for the lines `shown` on the contact sheet, checked before
    any decoding: a folder's images by their recorded names (a renamed or deleted file is named, never
    replaced by its neighbour), a data config's by position once it still gives the same images."""
    meta_file = tokens_dir / META_FILE
    if not meta_file.is_file():
        raise ConfigError("--originals needs a TOKENS directory written by dvae-encode (with its meta.json).")
    meta = _tokens_meta(tokens_dir)
    spec, size = meta.get("data"), meta.get("image_size")
    if not isinstance(spec, dict) or spec.get("kind") not in ("folder", "config") or not isinstance(size, int) \
            or isinstance(size, bool) or size < 1:
        raise ConfigError(f"{meta_file} does not say which images the tokens were made from (its data or "
                          f"image_size is missing or damaged); decode without --originals.")
    if spec["kind"] == "folder":
        root = Path(str(spec.get("root")))
        if not root.is_dir():
            raise ConfigError(f"--originals: the image folder {root} that {meta_file} names no longer exists; "
                              f"decode without --originals.")
        for record in shown:
            name = Path(record["source"])
            if name.is_absolute() or ".." in name.parts or not (root / name).is_file():
                raise ConfigError(f"--originals: {root / name}, an image the tokens were made from, is no longer "
                                  f"there (renamed, moved or deleted); put it back, or decode without --originals.")
        return lambda record: load_image(root / record["source"], size, channels)
    dataset, sources, _ = open_images(str(spec.get("name")), size, channels, spec.get("split", "val"),
                                      spec.get("options") or {})
    if hashlib.sha256("\n".join(sources).encode()).hexdigest() != meta.get("sources_sha256") or \
            any(record["i"] >= len(sources) for record in shown):
        raise ConfigError(f"--originals: --data {spec.get('name')} no longer gives the images {meta_file} records "
                          f"(its sources' SHA-256 differs); decode without --originals.")
    return lambda record: dataset[record["i"]]


def decode_tokens(model_dir: str | Path, tokens: str | Path, out: str | Path, grid: bool = False,
                  limit: int | None = None, batch_size: int = 64, nrow: int = 8, originals: bool = False,
                  device: str = "auto", force: bool = False, progress: bool = True) -> Path:
    """Decode token grids to PNGs under `out`, or (grid) to one contact sheet. Returns what was written."""
    model_dir, tokens, out = Path(model_dir), Path(tokens), Path(out)
    if not tokens.exists():
        raise ConfigError(f"--tokens {tokens} does not exist; pass a directory written by dvae-encode or a .npy file.")
    for name, value in (("--batch-size", batch_size), ("--nrow", nrow), ("--limit", 1 if limit is None else limit)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} {value} must be a positive integer.")
    if originals and not grid:
        raise ConfigError("--originals only applies to --grid; add --grid.")
    if grid and out.suffix.lower() == ".png":
        sheet = out
        if sheet.exists() and not force:
            raise ConfigError(f"--out {sheet} exists; choose a new file name or pass --force to replace it.")
    else:
        check_out_dir(out, force)
        sheet = out / CONTACT_SHEET
    if grid and limit is None:
        limit = 64
    dev = resolve_device(device)
    config = read_config(model_dir)
    meta = check_tokens_fit_model(tokens, config, model_dir)
    total = count_tokens(tokens)
    total = min(total, limit) if limit else total
    _check_decode_memory(tokens, meta, config, dev, min(batch_size, total), total if grid else 0, originals)
    original = None
    if originals:  # the first `total` lines, in the order iter_tokens yields them
        shown = sorted(_read_index(tokens, strict=True), key=lambda record: record["shard"])[:total]
        original = _originals(tokens, config["channels"], shown)
    model = from_pretrained(model_dir, device=dev)[0]
    tiles, originals_list, written, taken = [], [], 0, set()
    with _progress(progress) as bar, torch.inference_mode():
        task = bar.add_task("decoding", total=total or None)
        for array, records in iter_tokens(tokens):
            if limit is not None:
                array, records = array[: limit - written], records[: limit - written]
            check_token_grids(array, model.K, f"--tokens {tokens}", meta.get("grid"))
            for start in range(0, len(array), batch_size):
                chunk = torch.from_numpy(array[start:start + batch_size].astype(np.int64)).to(dev)
                rows = records[start:start + batch_size]
                try:
                    images = to_uint8(model.decode(chunk))
                except ValueError as error:
                    raise ConfigError(f"--tokens {tokens} does not fit --model {model_dir}: {error}") from error
                if grid:
                    tiles.append(images)
                    if original is not None:
                        originals_list += [to_uint8(original(r)) for r in rows]
                else:
                    for image, record in zip(images, rows):
                        save_png(image, out / _png_name(record["source"], record["i"], taken))
                written += len(rows)
                bar.advance(task, len(rows))
            if limit is not None and written >= limit:
                break
    if written == 0:
        raise ConfigError(f"--tokens {tokens} holds no token grids; run dvae-encode first.")
    if not grid:
        print(f"dvae-decode: {written} images in {out}", file=sys.stderr)
        return out
    save_png(contact_sheet(torch.cat(tiles), originals_list, nrow), sheet)
    print(f"dvae-decode: a contact sheet of {written} images in {sheet}", file=sys.stderr)
    return sheet


def contact_sheet(decoded: Tensor, originals: list[Tensor] | None = None, nrow: int = 8) -> Tensor:
    """uint8 [N, C, H, W] -> one uint8 image, `nrow` per row on white; with originals, each row of
    originals sits above the row of their decodings."""
    from torchvision.utils import make_grid

    tiles = decoded
    if originals:
        rows = []
        for start in range(0, len(decoded), nrow):
            rows += [torch.stack(originals[start:start + nrow]), decoded[start:start + nrow]]
            pad = nrow - len(decoded[start:start + nrow])
            if pad and len(decoded) > nrow:  # keep the columns aligned in a short last row
                blank = torch.full((pad, *decoded.shape[1:]), 255, dtype=torch.uint8)
                rows[-2], rows[-1] = torch.cat([rows[-2], blank]), torch.cat([rows[-1], blank])
        tiles = torch.cat(rows)
    ncol = min(nrow, len(decoded))
    return make_grid(tiles, nrow=ncol, padding=2, pad_value=255)


# --------------------------------------------------------------------------------------------- CLIs


def _encode_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvae-encode",
        description="Turn images into token grids with an exported dVAE (dvae-export). An interrupted run "
                    "continues where it stopped when started again with the same arguments.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="an export directory (dvae-export)")
    parser.add_argument("--data", required=True, metavar="IMAGES_DIR_OR_CONFIG",
                        help=f"a folder of images (searched recursively) or a data config: {', '.join(DATA_CONFIGS)} "
                             "or a .yaml file")
    parser.add_argument("--out", required=True, metavar="TOKENS", help="the directory of token shards to write")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels, a multiple of the downsampling factor (default: the training "
                             "crop size in dvae.json); images are resized (shorter side) and centre-cropped")
    parser.add_argument("--split", default="val", choices=("val", "train"), help="for a data config (default: val)")
    parser.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the data config, e.g. root=/data/mnist (repeatable)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard (default: 1024)")
    parser.add_argument("--workers", type=int, default=0, help="image-loading processes (default: 0)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--force", action="store_true", help="start over in a --out that holds other tokens")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _decode_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvae-decode",
        description="Turn token grids (dvae-encode) back into images with an exported dVAE.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="an export directory (dvae-export)")
    parser.add_argument("--tokens", required=True, metavar="TOKENS",
                        help="a directory written by dvae-encode, or a .npy file of [N, h, w] tokens")
    parser.add_argument("--out", required=True, metavar="IMAGES_DIR",
                        help="the directory for the PNGs (with --grid: for contact_sheet.png, or a .png path)")
    parser.add_argument("--grid", action="store_true", help="write one contact sheet instead of one PNG per image")
    parser.add_argument("--originals", action="store_true",
                        help="with --grid: put each row of source images above its decodings")
    parser.add_argument("--nrow", type=int, default=8, help="images per row of the contact sheet (default: 8)")
    parser.add_argument("--limit", type=int, default=None,
                        help="decode only the first N (default: all; 64 with --grid)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def encode_main(argv: list[str] | None = None) -> int:
    args = _encode_parser().parse_args(argv)
    try:
        encode_dataset(args.model, args.data, args.out, size=args.size, split=args.split,
                       batch_size=args.batch_size, shard_size=args.shard_size, device=args.device,
                       workers=args.workers, force=args.force, data_options=args.data_option,
                       progress=not args.no_progress)
    except ConfigError as error:
        print(f"dvae-encode: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an unreadable image (our message names it), or a file --out could not take
        hint = ("replace it with a readable image, then run the same command to continue (or remove it and add "
                "--force to start over)") if error.filename is None else \
            "fix that, then run the same command to continue"
        print(f"dvae-encode: error: {os_error_sentence(error)}; {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dvae-encode: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    return 0


def decode_main(argv: list[str] | None = None) -> int:
    args = _decode_parser().parse_args(argv)
    try:
        decode_tokens(args.model, args.tokens, args.out, grid=args.grid, limit=args.limit,
                      batch_size=args.batch_size, nrow=args.nrow, originals=args.originals,
                      device=args.device, force=args.force, progress=not args.no_progress)
    except ConfigError as error:
        print(f"dvae-decode: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file that could not be read, or an --out that could not be written
        print(f"dvae-decode: error: {os_error_sentence(error)}; fix that and run the command again.", file=sys.stderr)
        return 2
    return 0


def encode_cli() -> None:
    sys.exit(encode_main())


def decode_cli() -> None:
    sys.exit(decode_main())


if __name__ == "__main__":  # python -m dvae.formats.tokens encode|decode ...
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command not in ("encode", "decode"):
        sys.exit("usage: python -m dvae.formats.tokens encode|decode ARGS (or dvae-encode and dvae-decode)")
    sys.exit((encode_main if command == "encode" else decode_main)(sys.argv[2:]))
