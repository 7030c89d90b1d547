"""Any directory tree of image files (`data.root=PATH`), searched recursively.

Images are read from disk on every access (a folder may not fit in memory), converted to RGB, upscaled if
smaller than the crop, then cropped: random crop + flip for training, center crop for validation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from ..errors import ConfigError
from .common import CroppedImages

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def find_images(root: Path) -> tuple[list[Path], int]:
    """Image files under `root`, sorted so the order is the same on every machine, and the count of all files.

    Hidden files and folders are skipped (e.g. macOS "._photo.jpg" resource forks are not images).
    """
    files = sorted(path for path in root.rglob("*") if path.is_file())
    images = [
        path for path in files
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    return images, len(files)


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


def read_rgb(path: Path) -> Tensor:
    """uint8 [3, H, W]; EXIF rotation applied, grey repeated, alpha dropped, 16-bit reduced to 8-bit."""
    try:
        with Image.open(path) as image:
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
                 min_length: int = 0) -> None:
        super().__init__(len(files), crop_size, train, seed, random_flip, min_length)
        self.files = files

    def load_image(self, index: int) -> Tensor:
        return read_rgb(self.files[index])


def build_folder(root: str | None, crop_size: int, train_samples: int, val_fraction: float, seed: int,
                 random_flip: bool) -> tuple[FolderImages, FolderImages]:
    if root is None or str(root).strip() in ("", "???"):
        raise ConfigError("data.root is not set; set data.root to a directory of image files.")
    path = Path(root).expanduser()
    if not path.exists():
        raise ConfigError(f"data.root={root} does not exist; set data.root to a directory of image files.")
    if not path.is_dir():
        raise ConfigError(
            f"data.root={root} is not a directory; set data.root to a directory of image files."
        )
    files, seen = find_images(path)
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
    return (FolderImages(train, crop_size, True, seed, random_flip, min_length=train_samples),
            FolderImages(val, crop_size, False, seed, random_flip))
