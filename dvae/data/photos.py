"""Random crops of the colour photographs that ship inside scikit-image's wheel: real images, fully offline.

Only files already on disk are read (nothing goes through scikit-image's pooch fetcher). Two photos are held
out for validation so validation measures generalisation to unseen pictures, not to unseen crops.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import skimage
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dvae.data.transforms import item_rng, random_crop, resize, to_unit_float
from dvae.errors import ConfigError

PHOTO_DIR = Path(skimage.__file__).parent / "data"

# Colour photographs only (no synthetic test patterns). The motorcycle stereo pair stays on one side, and
# the validation photos (a cat and a cup of coffee) show subjects that no training photo shows.
TRAIN_PHOTOS = (
    "astronaut.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
VAL_PHOTOS = ("chelsea.png", "coffee.png")


@functools.cache
def load_photo(name: str) -> Tensor:
    """uint8 [3, H, W]; cached because every datamodule (and test) uses the same few photos."""
    with Image.open(PHOTO_DIR / name) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def pyramid_scales(min_scale: float) -> list[float]:
    """1 down to `min_scale` in steps of about half an octave (a factor of sqrt(2))."""
    steps = math.ceil(2 * math.log2(1 / min_scale) - 1e-9)
    if steps <= 0:
        return [1.0]
    return [min_scale ** (k / steps) for k in range(steps + 1)]


@functools.cache
def photo_pyramid(name: str, min_scale: float) -> tuple[Tensor, ...]:
    """The photo at each scale of `pyramid_scales`, precomputed so that a crop is just a slice."""
    photo = load_photo(name)
    _, height, width = photo.shape
    return tuple(resize(photo, round(height * s), round(width * s)) for s in pyramid_scales(min_scale))


class PhotoCrops(Dataset[Tensor]):
    """Crops of random photos at random scales, one RNG per sample keyed on (seed, index).

    Training indices come from `EpochSampler` and grow from epoch to epoch, so crops never repeat; the
    validation set ignores the seed, so its `length` crops are the same in every run and comparable across
    seeds.
    """

    channels = 3

    def __init__(self, names: tuple[str, ...], crop_size: int, min_scale: float, length: int,
                 train: bool, seed: int, random_flip: bool) -> None:
        self.names = names
        self.crop_size = crop_size
        self.length = length
        self.train = train
        self.seed = seed
        self.random_flip = random_flip and train
        # Per photo, the scales at which a whole crop still fits.
        self.levels = [
            [level for level in photo_pyramid(name, min_scale) if min(level.shape[-2:]) >= crop_size]
            for name in names
        ]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tensor:
        rng = item_rng("photos", self.seed, index) if self.train else item_rng("photos-val", index)
        levels = self.levels[rng.randrange(len(self.levels))]
        photo = levels[rng.randrange(len(levels))]
        return to_unit_float(random_crop(photo, self.crop_size, rng, self.random_flip))


def build_photos(
    crop_size: int, min_scale: float, train_samples: int, val_samples: int, seed: int, random_flip: bool
) -> tuple[PhotoCrops, PhotoCrops]:
    missing = [name for name in TRAIN_PHOTOS + VAL_PHOTOS if not (PHOTO_DIR / name).is_file()]
    if missing:
        raise ConfigError(
            f"data.name=photos needs the photos bundled with scikit-image but {', '.join(missing)} "
            f"are missing from {PHOTO_DIR}; reinstall scikit-image or set data.name to another source."
        )
    smallest = min(min(load_photo(name).shape[-2:]) for name in TRAIN_PHOTOS + VAL_PHOTOS)
    if crop_size > smallest:
        raise ConfigError(
            f"data.crop_size={crop_size} is larger than the smallest bundled photo ({smallest} px); "
            f"set data.crop_size to at most {smallest} or use data.name=folder with larger images."
        )
    train = PhotoCrops(TRAIN_PHOTOS, crop_size, min_scale, train_samples, True, seed, random_flip)
    val = PhotoCrops(VAL_PHOTOS, crop_size, min_scale, val_samples, False, seed, random_flip)
    return train, val
