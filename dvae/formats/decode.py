"""Decoding: a token set -> PNG images (or a contact sheet), with the model that made it."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dvae.data.images import load_image, open_images, save_png, to_uint8
from dvae.errors import ConfigError
from dvae.formats.devices import check_decode_memory, progress_bar, resolve_device
from dvae.formats.tokens import (
    META_FILE,
    check_token_grids,
    check_tokens_fit_model,
    count_tokens,
    iter_tokens,
    read_index,
    tokens_meta,
)
from dvae.model import DVAE
from dvae.pretrained import check_out_dir, read_config

CONTACT_SHEET = "contact_sheet.png"


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
    meta = tokens_meta(tokens_dir)
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
    check_decode_memory(tokens, meta, config, dev, min(batch_size, total), total if grid else 0, originals)
    original = None
    if originals:  # the first `total` lines, in the order iter_tokens yields them
        shown = sorted(read_index(tokens, strict=True), key=lambda record: record["shard"])[:total]
        original = _originals(tokens, config["channels"], shown)
    model = DVAE.from_pretrained(model_dir, device=dev)
    tiles, originals_list, written, taken = [], [], 0, set()
    with progress_bar(progress) as bar, torch.inference_mode():
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
