"""The crops every source serves, with per-item seeded randomness: random crop and flip, the paper's
augmentation, centre crop, resizing; `CroppedImages` serves them from in-memory images.

Randomness is keyed on (seed, sample index) instead of a global or per-worker RNG, so a sample is the
same whatever `num_workers` is, and two runs with the same seed see exactly the same batches.
"""

from __future__ import annotations

import hashlib
import random

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


def stable_seed(*key: object) -> int:
    """A 63-bit seed derived from `key` that is the same in every process and Python version."""
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def item_rng(*key: object) -> random.Random:
    """A cheap private RNG for one sample; string seeds are hashed deterministically (not PYTHONHASHSEED)."""
    return random.Random(":".join(map(str, key)))


def to_unit_float(image: Tensor) -> Tensor:
    """uint8 [C, H, W] -> float32 in [0, 1]; the model maps pixels to its own range itself."""
    return image.to(torch.float32).div_(255.0)


def random_crop(image: Tensor, size: int, rng: random.Random, flip: bool) -> Tensor:
    """A `size` x `size` crop at a position drawn from `rng`, horizontally flipped half the time if `flip`."""
    _, height, width = image.shape
    top = rng.randint(0, height - size)
    left = rng.randint(0, width - size)
    crop = image[:, top : top + size, left : left + size]
    if flip and rng.random() < 0.5:
        crop = crop.flip(-1)
    return crop


AUGMENTATIONS = ("crop", "paper")


def paper_augment(image: Tensor, size: int, rng: random.Random, flip: bool) -> Tensor:
    """The paper's augmentation, scaled to `size` (paper-facts.md, for size 256): a random square crop of
    side s (the shorter side), an area (antialiased) resize to a random side in
    [min(s, 1.125 size), min(s, 1.5 size)] (288 and 384 for 256), a random `size` crop, a random flip."""
    _, height, width = image.shape
    side = min(height, width)
    top, left = rng.randint(0, height - side), rng.randint(0, width - side)
    square = image[:, top : top + side, left : left + side]
    low, high = min(side, round(1.125 * size)), min(side, round(1.5 * size))
    target = rng.randint(low, high)
    return random_crop(resize(square, target, target), size, rng, flip)


def evaluation_view(image: Tensor, size: int) -> Tensor:
    """uint8 [C, H, W] -> uint8 [C, size, size]: how validation, dvae-eval and dvae-encode all see an image of
    any size, the field's protocol (ImageNet at 256 included): the shorter side resized to `size` (antialiased
    bilinear, up or down), then the centre square. Keeping it one function keeps their figures comparable."""
    _, height, width = image.shape
    scale = size / min(height, width)
    # max() guards against rounding the shorter side to size - 1.
    image = resize(image, max(size, round(height * scale)), max(size, round(width * scale)))
    return center_crop(image, size)


def center_crop(image: Tensor, size: int) -> Tensor:
    _, height, width = image.shape
    top = (height - size) // 2
    left = (width - size) // 2
    return image[:, top : top + size, left : left + size]


def resize(image: Tensor, height: int, width: int) -> Tensor:
    """Bilinear, antialiased resize of a uint8 [C, H, W] image, returned as uint8."""
    if image.shape[-2:] == (height, width):
        return image
    resized = F.interpolate(image[None].to(torch.float32), size=(height, width), mode="bilinear",
                            antialias=True, align_corners=False)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def grow_to_fit(image: Tensor, size: int) -> Tensor:
    """Upscale (keeping the aspect ratio) so that the shorter side is at least `size`; never downscale."""
    _, height, width = image.shape
    shorter = min(height, width)
    if shorter >= size:
        return image
    scale = size / shorter
    # max() guards against rounding the shorter side to size - 1.
    return resize(image, max(size, round(height * scale)), max(size, round(width * scale)))


class CroppedImages(Dataset[Tensor]):
    """A finite list of images served as crops: random crop + flip for training, `evaluation_view` for validation.

    Training indices are the "virtual" indices from `EpochSampler`: image = index % num_images, and the crop
    is drawn from an RNG keyed on the whole index, so every epoch sees new crops. The training length is at
    least `min_length`, so a folder of 20 large images still gives a useful epoch of random crops.
    """

    channels: int = 3

    def __init__(self, num_images: int, crop_size: int, train: bool, seed: int, random_flip: bool,
                 min_length: int = 0, resize_to: int | None = None, augment: str = "crop") -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r} is not known; use one of {', '.join(AUGMENTATIONS)}.")
        self.augment = augment
        self.num_images = num_images
        self.crop_size = crop_size
        self.train = train
        self.seed = seed
        self.random_flip = random_flip
        self.length = max(num_images, min_length) if train else num_images
        self.resize_to = resize_to

    def load_image(self, index: int) -> Tensor:
        """uint8 [channels, H, W] image number `index`."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tensor:
        image = self.load_image(index % self.num_images)
        if self.resize_to is not None:
            image = resize(image, self.resize_to, self.resize_to)
        if not self.train:
            return to_unit_float(evaluation_view(image, self.crop_size))
        image = grow_to_fit(image, self.crop_size)
        rng = item_rng(type(self).__name__, self.seed, index)
        augment = paper_augment if self.augment == "paper" else random_crop
        return to_unit_float(augment(image, self.crop_size, rng, self.random_flip))
