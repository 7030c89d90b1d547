"""CelebA from a local root in torchvision's layout, served like data=folder: `root/celeba/img_align_celeba/*.jpg`
and `list_eval_partition.txt` (with the other annotation files torchvision checks); torchvision's `CelebA`
finds and checks them, and its "train" / "valid" partitions are the splits."""

from __future__ import annotations

from pathlib import Path

from dvae.data.folder import BadFiles, FolderImages, layout_splits
from dvae.errors import ConfigError


def build_celeba(root: str | None, crop_size: int, train_samples: int, seed: int, random_flip: bool,
                 augment: str, on_bad_file: str, bad_files: BadFiles | None,
                 cache_mb: float = 0) -> tuple[FolderImages, FolderImages]:
    from torchvision import datasets

    path = Path(root or ".").expanduser()

    def split(name: str) -> list[Path]:
        try:
            found = datasets.CelebA(str(path), split=name, target_type=[], download=False)
        except (RuntimeError, OSError) as error:
            raise ConfigError(
                f"CelebA was not found (or is corrupted) under data.root={path}; data.root needs "
                f"{path}/celeba/img_align_celeba/*.jpg and the annotation files (list_eval_partition.txt, ...) "
                "as torchvision's CelebA expects them."
            ) from error
        return [path / found.base_folder / "img_align_celeba" / file for file in found.filename]

    return layout_splits(split, ("train", "valid"), path, crop_size, train_samples, seed, random_flip, augment,
                         on_bad_file, bad_files, cache_mb)
