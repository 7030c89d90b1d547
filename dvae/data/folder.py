"""Any directory tree of image files (`data.root=PATH`), searched recursively.

Images are read from disk on every access (a folder may not fit in memory), converted to RGB (grey,
palette, RGBA and 16-bit images included), upscaled with a warning if smaller than the crop, then cropped:
random crop + flip (or `data.augment=paper`) for training, center crop for validation.

The file list is cached (see `folder_index`), so a folder of millions of files is not walked at every
start. A file that cannot be read is skipped with one warning naming it and another image is served in
its place (`data.on_bad_file=skip`, the default), or stops the run (`error`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from ..errors import ConfigError
from ..files import not_a_regular_file
from .common import CroppedImages

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# What Pillow may open, whatever a file is named (it goes by the content): the formats of the extensions above,
# tar shards' .ppm, and MPO (a JPEG with extra frames, as cameras write). Others stay shut: EPS runs Ghostscript.
IMAGE_FORMATS = ("BMP", "GIF", "JPEG", "MPO", "PNG", "PPM", "TIFF", "WEBP")


INDEX_HEADER = "# dvae folder index v1"


def walk_images(root: Path) -> tuple[list[Path], int]:
    """Image files under `root`, sorted so the order is the same on every machine, and the count of all files.

    Hidden files and folders are skipped (e.g. macOS "._photo.jpg" resource forks are not images).
    """
    images, seen = [], 0
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        seen += len(names)
        images += [Path(folder) / name for name in names
                   if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(images), seen


def default_index_path(root: Path) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dvae" / "folder-index"
    return cache / f"{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]}.txt"


def folder_index(root: Path, rescan: bool = False, index: Path | None = None) -> tuple[list[Path], int]:
    """`walk_images(root)`, cached in a text file (`data.index`, default ~/.cache/dvae/folder-index/).

    The cache is used while the root directory's modification time is unchanged (adding or removing an
    entry directly under the root changes it); after changes deeper in the tree, set `data.rescan=true`
    once. A listed file that has since disappeared is skipped like any unreadable file.
    """
    index = index or default_index_path(root)
    stamp = f"{INDEX_HEADER} root={root.resolve()} mtime_ns={root.stat().st_mtime_ns}"
    if not rescan and index.is_file():
        with index.open(encoding="utf-8") as file:
            header, _, seen = file.readline().rstrip("\n").rpartition(" seen=")
            if header == stamp:
                return [root / line.rstrip("\n") for line in file], int(seen)
    files, seen = walk_images(root)
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f".{index.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as file:
            file.write(f"{stamp} seen={seen}\n")
            file.writelines(f"{path.relative_to(root).as_posix()}\n" for path in files)
        os.replace(tmp, index)
    except OSError as error:  # a read-only home: work without the cache
        warnings.warn(f"could not write the folder index {index} ({error}); the folder is walked at every start",
                      stacklevel=2)
    return files, seen


class BadFiles:
    """Files that could not be read, collected from every DataLoader worker through one small text file
    per process in `folder`, so the main process can report them at the end."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.seen: set[str] = set()

    def record(self, path: Path, reason: str) -> None:
        if str(path) in self.seen:
            return
        self.seen.add(str(path))
        warnings.warn(f"skipping {path}: {reason}", stacklevel=2)
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"bad-{os.getpid()}.txt").open("a", encoding="utf-8") as file:
            file.write(f"{path}\t{reason}\n")

    def entries(self) -> list[tuple[str, str]]:
        if not self.folder.is_dir():
            return []
        lines = {line for log in self.folder.glob("bad-*.txt") for line in log.read_text().splitlines() if line}
        return sorted(tuple(line.split("\t", 1)) for line in lines)


def split_by_hash(files: list[Path], root: Path, val_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, val): the files whose relative path hashes lowest go to validation (at least one, and at
    least one file is left for training).

    Hashing the path instead of shuffling keeps an image on the same side when files are added or removed.
    """

    def key(path: Path) -> str:
        return hashlib.sha1(path.relative_to(root).as_posix().encode()).hexdigest()

    ranked = sorted(files, key=key)
    num_val = min(len(files) - 1, max(1, round(val_fraction * len(files))))
    val = set(ranked[:num_val])
    return [f for f in files if f not in val], [f for f in files if f in val]


def open_image(file: Path | IO[bytes]) -> Image.Image:
    """`Image.open` limited to IMAGE_FORMATS."""
    Image.init()
    return Image.open(file, formats=[name for name in IMAGE_FORMATS if name in Image.OPEN])


def read_rgb(path: Path) -> Tensor:
    """uint8 [3, H, W]; EXIF rotation applied, grey repeated, alpha dropped, 16-bit reduced to 8-bit."""
    try:
        kind = not_a_regular_file(path)
        if kind:  # not opened: a FIFO would wait for a writer forever
            raise OSError(f"it is {kind}, not an image file")
        with open_image(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I;16"):  # convert("RGB") would clip 16-bit values instead of scaling
                image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
            array = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise OSError(f"could not read image {path}: {error}") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class FolderImages(CroppedImages):
    channels = 3

    def __init__(self, files: list[Path], crop_size: int, train: bool, seed: int, random_flip: bool,
                 min_length: int = 0, augment: str = "crop", bad_files: BadFiles | None = None,
                 on_bad_file: str = "skip") -> None:
        super().__init__(len(files), crop_size, train, seed, random_flip, min_length, augment=augment)
        self.files = files
        self.bad_files = bad_files
        self.on_bad_file = on_bad_file
        self.warned_small: set[int] = set()

    def load_image(self, index: int) -> Tensor:
        """Image `index`, or with on_bad_file=skip the next readable one after it (deterministic)."""
        for offset in range(len(self.files)):
            candidate = (index + offset) % len(self.files)
            try:
                image = read_rgb(self.files[candidate])
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                reason = str(error.__cause__ or error)
                if self.on_bad_file == "error":
                    raise RuntimeError(f"could not read image {self.files[candidate]} ({reason}); fix or remove "
                                       "it, or set data.on_bad_file=skip to skip such files.") from error
                if self.bad_files is not None:
                    self.bad_files.record(self.files[candidate], reason)
                continue
            if min(image.shape[-2:]) < self.crop_size and candidate not in self.warned_small:
                self.warned_small.add(candidate)
                warnings.warn(f"{self.files[candidate]} is {image.shape[2]}x{image.shape[1]}, smaller than "
                              f"data.crop_size={self.crop_size}; it is resized up", stacklevel=2)
            return image
        raise RuntimeError(f"none of the {len(self.files)} images could be read; see the warnings above.")


def build_folder(root: str | None, crop_size: int, train_samples: int, val_fraction: float, seed: int,
                 random_flip: bool, augment: str = "crop", on_bad_file: str = "skip", rescan: bool = False,
                 index: str | None = None, bad_files: BadFiles | None = None) -> tuple[FolderImages, FolderImages]:
    if root is None or str(root).strip() in ("", "???"):
        raise ConfigError("data.root is not set; set data.root to a directory of image files.")
    path = Path(root).expanduser()
    if not path.exists():
        raise ConfigError(f"data.root={root} does not exist; set data.root to a directory of image files.")
    if not path.is_dir():
        raise ConfigError(
            f"data.root={root} is not a directory; set data.root to a directory of image files."
        )
    files, seen = folder_index(path, rescan, Path(index).expanduser() if index else None)
    if not files:
        raise ConfigError(
            f"data.root={root} contains no image files ({seen} files seen, accepted extensions: "
            f"{', '.join(IMAGE_EXTENSIONS)}); set data.root to a directory of image files."
        )
    if len(files) < 2:
        raise ConfigError(
            f"data.root={root} contains only 1 image file but at least 2 are needed (one is held out for "
            f"validation); add images to data.root."
        )
    train, val = split_by_hash(files, path, val_fraction)
    options = {"bad_files": bad_files, "on_bad_file": on_bad_file}
    return (FolderImages(train, crop_size, True, seed, random_flip, min_length=train_samples, augment=augment,
                         **options),
            FolderImages(val, crop_size, False, seed, random_flip, **options))
