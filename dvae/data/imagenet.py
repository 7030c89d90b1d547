"""ImageNet from a local root, served like data=folder: `root/train/<wnid>/*.JPEG` and `root/val/<wnid>/*.JPEG`,
the ImageFolder layout that torchvision's `ImageNet` class builds (its devkit archive is not needed). The file
lists are cached like data=folder's."""

from __future__ import annotations

from pathlib import Path

from dvae.data.folder import BadFiles, FolderImages, folder_index, layout_splits
from dvae.errors import ConfigError


def build_imagenet(root: str | None, crop_size: int, train_samples: int, seed: int, random_flip: bool,
                   augment: str, on_bad_file: str, bad_files: BadFiles | None,
                   rescan: bool, cache_mb: float = 0) -> tuple[FolderImages, FolderImages]:
    path = Path(root or ".").expanduser()

    def split(name: str) -> list[Path]:
        folder = path / name
        if not folder.is_dir():
            raise ConfigError(f"data.root={path} has no {name}/ directory for ImageNet's {name} split; data.root must "
                              "hold train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (torchvision's ImageFolder layout).")
        files, seen = folder_index(folder, rescan)
        if not files:
            raise ConfigError(f"data.root={path}: {folder} holds no images ({seen} files seen); data.root must "
                              "hold train/<wnid>/*.JPEG and val/<wnid>/*.JPEG.")
        return files

    return layout_splits(split, ("train", "val"), path, crop_size, train_samples, seed, random_flip, augment,
                         on_bad_file, bad_files, cache_mb)
