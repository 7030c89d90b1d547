"""`DVAEDataModule`: one LightningDataModule for every data source, configured by primitive values.

Every mistake a user can make in `data.*` is caught in `__init__` (a `ConfigError` naming the key), so a
bad config fails before any model is built or any step is trained.
"""

from __future__ import annotations

import inspect
import numbers
import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from dvae.data.celeba import build_celeba
from dvae.data.folder import BadFiles, build_folder
from dvae.data.imagenet import build_imagenet
from dvae.data.photos import build_photos
from dvae.data.samplers import EpochSampler, RankShard, ResumableLoader
from dvae.data.shapes import build_shapes
from dvae.data.torchvision_sets import build_cifar10, build_mnist
from dvae.data.transforms import AUGMENTATIONS, stable_seed
from dvae.data.webdataset import ShardStream, StreamLoader, build_webdataset
from dvae.errors import ConfigError

SOURCES = ("photos", "shapes", "folder", "mnist", "cifar10", "celeba", "imagenet", "webdataset")
BAD_FILE_POLICIES = ("skip", "error")
FILE_SOURCES = ("folder", "celeba", "imagenet")  # read image files through FolderImages
MIN_CROP_SIZE = 8


class DVAEDataModule(L.LightningDataModule):
    """Float32 [B, C, crop_size, crop_size] batches in [0, 1], no labels.

    One training epoch is `train_samples` crops for photos and shapes, and max(training images,
    `train_samples`) for folder, mnist and cifar10. Every random choice is keyed on (seed, sample index), so
    batches depend only on the seed, never on the global RNG or on `num_workers`. The validation set does
    not depend on the seed, so validation metrics of runs with different seeds are comparable.
    """

    def __init__(self, source: str = "photos", root: str | None = None, crop_size: int = 32,
                 batch_size: int = 64, num_workers: int = 0, random_flip: bool = True, seed: int = 0,
                 train_samples: int = 4096, val_samples: int = 256, val_fraction: float = 0.05,
                 download: bool = False, val_batch_size: int | None = None, min_scale: float = 0.25,
                 augment: str = "crop", on_bad_file: str = "skip", rescan: bool = False, index: str | None = None,
                 urls: Any = None, val_urls: Any = None, shuffle_buffer: int = 1000, cache_mb: float = 0) -> None:
        super().__init__()
        self.source = source
        self.root = None if root is None else os.fspath(root)
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.seed = seed
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.val_fraction = val_fraction
        self.download = download
        self.val_batch_size = val_batch_size
        self.min_scale = min_scale
        self.augment = augment
        self.on_bad_file = on_bad_file
        self.rescan = rescan
        self.index = index
        self.urls = urls
        self.val_urls = val_urls
        self.shuffle_buffer = shuffle_buffer
        self.cache_mb = cache_mb
        self.validate()
        # created only when a file is skipped; workers inherit the path and write beside the main process
        self.bad_file_log = BadFiles(Path(tempfile.gettempdir()) / f"dvae-bad-files-{os.getpid()}-{uuid.uuid4().hex}")
        # Built here rather than in setup(): missing files must fail now, before training starts.
        self.train_set, self.val_set = self._build_datasets()

    @property
    def channels(self) -> int:
        return self.train_set.channels

    def validate(self) -> None:
        """Check the source-independent options; sources check their own (root, files, crop size)."""
        if self.source not in SOURCES:
            raise ConfigError(
                f"data.name={self.source!r} is not a known data source; set data.name to one of "
                f"{', '.join(SOURCES)}."
            )
        _check_int("crop_size", self.crop_size, MIN_CROP_SIZE)
        _check_int("batch_size", self.batch_size, 1)
        if self.val_batch_size is not None:
            _check_int("val_batch_size", self.val_batch_size, 1)
        _check_int("num_workers", self.num_workers, 0)
        _check_int("seed", self.seed, 0)
        _check_int("train_samples", self.train_samples, 1)
        _check_int("val_samples", self.val_samples, 1)
        if self.train_samples < self.batch_size:
            raise ConfigError(
                f"data.train_samples={self.train_samples} is smaller than data.batch_size={self.batch_size}, "
                f"which leaves no full training batch; raise data.train_samples or lower data.batch_size."
            )
        _check_int("shuffle_buffer", self.shuffle_buffer, 1)
        for key, choices in (("augment", AUGMENTATIONS), ("on_bad_file", BAD_FILE_POLICIES)):
            if getattr(self, key) not in choices:
                raise ConfigError(f"data.{key}={getattr(self, key)!r} is not known; use one of {', '.join(choices)}.")
        if self.augment == "paper" and self.source in ("photos", "shapes", "mnist"):
            raise ConfigError(f"data.augment=paper does not apply to data={self.source} (it has its own crops); "
                              "use it with folder, celeba, imagenet, cifar10 or webdataset.")
        for key in ("random_flip", "download", "rescan"):
            if not isinstance(getattr(self, key), bool):
                value = getattr(self, key)
                raise ConfigError(f"data.{key}={value!r} is not a boolean; set data.{key} to true or false.")
        if not _is_number(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise ConfigError(
                f"data.val_fraction={self.val_fraction!r} is out of range; set data.val_fraction to a number "
                f"in [0, 1)."
            )
        if not _is_number(self.cache_mb) or not self.cache_mb >= 0:
            raise ConfigError(f"data.cache_mb={self.cache_mb!r} is out of range; set data.cache_mb to the megabytes of "
                              "decoded images to keep per split and data-loading process, 0 or more (0: none).")
        if self.cache_mb and self.source not in FILE_SOURCES:
            raise ConfigError(f"data.cache_mb applies to data={', '.join(FILE_SOURCES)} (image files), not to "
                              f"data={self.source}; remove data.cache_mb.")
        if not _is_number(self.min_scale) or not 0 < self.min_scale <= 1:
            raise ConfigError(
                f"data.min_scale={self.min_scale!r} is out of range; set data.min_scale to a number in "
                f"(0, 1]."
            )

    def _build_datasets(self) -> tuple[Dataset, Dataset]:
        if self.source == "photos":
            return build_photos(self.crop_size, float(self.min_scale), self.train_samples, self.val_samples,
                                self.seed, self.random_flip)
        if self.source == "shapes":
            return build_shapes(self.crop_size, self.train_samples, self.val_samples, self.seed)
        files = {"augment": self.augment, "on_bad_file": self.on_bad_file, "bad_files": self.bad_file_log,
                 "cache_mb": float(self.cache_mb)}
        if self.source == "folder":
            return build_folder(self.root, self.crop_size, self.train_samples, float(self.val_fraction),
                                self.seed, self.random_flip, rescan=self.rescan, index=self.index, **files)
        if self.source == "celeba":
            return build_celeba(self.root, self.crop_size, self.train_samples, self.seed, self.random_flip, **files)
        if self.source == "imagenet":
            return build_imagenet(self.root, self.crop_size, self.train_samples, self.seed, self.random_flip,
                                  rescan=self.rescan, **files)
        if self.source == "webdataset":
            return build_webdataset(self.urls, self.val_urls, self.crop_size, self.train_samples, self.seed,
                                    self.random_flip, self.augment, self.shuffle_buffer, self.on_bad_file,
                                    self.bad_file_log)
        build = build_mnist if self.source == "mnist" else build_cifar10
        return build(self.root, self.crop_size, self.train_samples, self.seed, self.random_flip,
                     self.download, **({"augment": self.augment} if self.source == "cifar10" else {}))

    def bad_files(self) -> list[tuple[str, str]]:
        """(path, reason) of every file skipped as unreadable so far, from all workers of this process."""
        return self.bad_file_log.entries()

    def take_bad_files(self) -> list[tuple[str, str]]:
        """`bad_files()`, then the temporary folder behind it removed: for the end of a run."""
        entries = self.bad_files()
        self.bad_file_log.remove()
        return entries

    def ranks(self) -> tuple[int, int]:
        """(rank, world size) of this process: from the Trainer when one is attached, else (0, 1)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def per_rank_batch_size(self, world_size: int) -> int:
        global_batch = self.batch_size
        if global_batch % world_size:
            raise ConfigError(
                f"data.batch_size={global_batch} is the global batch and must split evenly over the {world_size} "
                f"processes; use a multiple of {world_size}."
            )
        return global_batch // world_size

    def train_dataloader(self) -> DataLoader:
        rank, world = self.ranks()
        if isinstance(self.train_set, ShardStream):
            readers = world * max(1, self.num_workers)
            if len(self.train_set.shards) < readers:
                raise ConfigError(
                    f"data.urls has {len(self.train_set.shards)} training shards but {readers} readers ({world} "
                    f"processes x {max(1, self.num_workers)} workers) need one each; use more shards or fewer "
                    "data.num_workers.")
            self.train_set.rank, self.train_set.world_size = rank, world
            return StreamLoader(self.train_set, batch_size=self.per_rank_batch_size(world),
                                drop_last=True, num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
        # EpochSampler shuffles, deals the epoch out to the ranks, and hands out new indices every epoch
        # so crops are fresh each epoch; ResumableLoader lets Lightning resume inside an epoch.
        return ResumableLoader(
            self.train_set,
            batch_size=self.per_rank_batch_size(world),
            sampler=EpochSampler(len(self.train_set), self.seed, rank, world),
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # its own generator: creating an iterator must not draw from torch's global RNG (exact resume)
            generator=torch.Generator().manual_seed(stable_seed("loader", self.seed)),
        )

    def val_dataloader(self) -> DataLoader:
        rank, world = self.ranks()
        batch_size = self.val_batch_size or self.per_rank_batch_size(world)
        if isinstance(self.val_set, ShardStream):
            self.val_set.rank, self.val_set.world_size = rank, world
            return DataLoader(self.val_set, batch_size=batch_size, num_workers=self.num_workers,
                              pin_memory=torch.cuda.is_available())
        return DataLoader(
            self.val_set,
            batch_size=batch_size,
            sampler=RankShard(len(self.val_set), rank, world),
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(stable_seed("loader", self.seed)),
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(key: str, value: Any, minimum: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ConfigError(
            f"data.{key}={value!r} is invalid; set data.{key} to an integer of at least {minimum}."
        )


def _plain_dict(cfg_data: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict; an OmegaConf config is resolved and its missing values (???) are kept as "???"."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:
        return dict(cfg_data)
    if isinstance(cfg_data, DictConfig):
        return OmegaConf.to_container(cfg_data, resolve=True, throw_on_missing=False)
    return dict(cfg_data)


def build_datamodule(cfg_data: Mapping[str, Any], seed: int) -> DVAEDataModule:
    """The datamodule for a `data` config: keys are the `DVAEDataModule` arguments, with `name` for `source`.

    `channels` is ignored (it is derived from the source; the model reads it from the config), and
    `seed` comes from the argument unless the config sets `data.seed`.
    """
    options = _plain_dict(cfg_data)
    options.pop("channels", None)
    if "name" in options:
        name = options.pop("name")
        if "source" in options and options["source"] != name:
            raise ConfigError(
                f"data.name={name!r} and data.source={options['source']!r} disagree; set only data.name."
            )
        options["source"] = name
    known = [key for key in inspect.signature(DVAEDataModule.__init__).parameters if key != "self"]
    for key in options:
        if key not in known:
            choices = ", ".join(["name", *(k for k in known if k != "source")])
            raise ConfigError(f"data.{key} is not a data option; remove it or use one of {choices}.")
    if options.get("seed") is None:
        options["seed"] = seed
    for key in ("root", "urls"):
        if options.get(key) == "???":  # OmegaConf's "missing": treat as not set
            options[key] = None
    return DVAEDataModule(**options)
