"""MNIST and CIFAR-10 through torchvision, with the official train/test splits as train/validation.

torchvision only locates, checks and (when `data.download=true`) fetches the files; the images are then
served from its in-memory uint8 arrays, which is much cheaper than its per-item PIL path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision import datasets

from dvae.data.transforms import CroppedImages
from dvae.errors import ConfigError

DEFAULT_ROOT = "~/.cache/dvae/datasets"


class TensorImages(CroppedImages):
    """Crops of images held in one uint8 [N, C, H, W] tensor."""

    def __init__(self, images: Tensor, crop_size: int, train: bool, seed: int, random_flip: bool,
                 min_length: int = 0, resize_to: int | None = None, augment: str = "crop") -> None:
        super().__init__(len(images), crop_size, train, seed, random_flip, min_length, resize_to, augment)
        self.images = images
        self.channels = images.shape[1]

    def load_image(self, index: int) -> Tensor:
        return self.images[index]


def open_torchvision(cls: type[datasets.VisionDataset], title: str, root: str | None, train: bool,
                     download: bool) -> datasets.VisionDataset:
    """Instantiate torchvision's dataset, turning its "not found" RuntimeError into a ConfigError."""
    path = Path(root or DEFAULT_ROOT).expanduser()
    try:
        return cls(str(path), train=train, download=download)
    except (RuntimeError, OSError) as error:
        if download:
            raise ConfigError(
                f"{title} could not be downloaded into data.root={path}; check the network connection, or "
                f"put the files there and set data.download=false."
            ) from error
        raise ConfigError(
            f"{title} was not found (or is corrupted) under data.root={path}; put the files there or set "
            f"data.download=true."
        ) from error


def build_mnist(root: str | None, crop_size: int, train_samples: int, seed: int, random_flip: bool,
                download: bool) -> tuple[TensorImages, TensorImages]:
    """1 x 28 x 28 digits, resized (bilinear) to crop_size x crop_size so that no stroke is cropped away."""

    def split(train: bool) -> TensorImages:
        images = open_torchvision(datasets.MNIST, "MNIST", root, train, download).data[:, None]
        return TensorImages(images, crop_size, train, seed, random_flip,
                            min_length=train_samples if train else 0, resize_to=crop_size)

    return split(True), split(False)


def build_cifar10(root: str | None, crop_size: int, train_samples: int, seed: int, random_flip: bool,
                  download: bool, augment: str = "crop") -> tuple[TensorImages, TensorImages]:
    """3 x 32 x 32 images: random crops (or upscaled if crop_size > 32) like any other image."""

    def split(train: bool) -> TensorImages:
        data = open_torchvision(datasets.CIFAR10, "CIFAR-10", root, train, download).data  # [N, H, W, C]
        images = torch.from_numpy(data).permute(0, 3, 1, 2)
        return TensorImages(images, crop_size, train, seed, random_flip,
                            min_length=train_samples if train else 0, augment=augment)

    return split(True), split(False)
