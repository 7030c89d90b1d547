"""Encoding: images -> a token set, shard by shard, continuing where a stopped run left off."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from dvae.data.images import open_images
from dvae.errors import ConfigError
from dvae.formats.devices import check_encode_memory, progress_bar, resolve_device
from dvae.formats.tokens import META_FILE, clear_tokens, completed, token_dtype, write_shard
from dvae.model import DVAE
from dvae.pretrained import check_out_dir, fingerprint, read_config, write_json


def image_size_for(config: dict[str, Any], size: int | None, model_dir: Path) -> int:
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
    given_size, size = size, image_size_for(config, size, model_dir)
    dataset, sources, spec = open_images(data, size, config["channels"], split, data_options)
    check_encode_memory(config, size, f"--size {size}" if given_size is not None else
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
    model = DVAE.from_pretrained(model_dir, device=dev)
    if continuing:
        done, shard = completed(out)
    else:
        check_out_dir(out, force)
        out.mkdir(parents=True, exist_ok=True)
        clear_tokens(out)
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
        with progress_bar(progress) as bar, torch.inference_mode():
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
                    write_shard(out, shard, block[:n], sources[position:position + n], position)
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
