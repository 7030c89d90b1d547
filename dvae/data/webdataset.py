"""Tar shards streamed with `webdataset` (data=webdataset): each rank and worker reads its own shards, and
samples are decoded, cropped and served in a seeded order."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dvae.data.folder import BadFiles
from dvae.data.image_files import UnreadableImage, one_line, open_image, rgb_array
from dvae.data.transforms import evaluation_view, grow_to_fit, paper_augment, random_crop, stable_seed, to_unit_float
from dvae.errors import ConfigError

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm")


def expand_shards(urls: str | list[str] | None, key: str) -> list[str]:
    """Shard paths or URLs from a brace pattern (`shards-{000..099}.tar`), a list, or a comma-separated
    string; local paths must exist."""
    from webdataset.shardlists import expand_urls

    if not urls:
        raise ConfigError(f"{key} is not set; set it to tar shards, e.g. {key}=/data/shards-{{000..099}}.tar.")
    patterns = [urls] if isinstance(urls, str) else list(urls)
    shards = [shard for pattern in patterns for part in str(pattern).split(",") if part.strip()
              for shard in expand_urls(part.strip())]
    local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
    missing = [s for s in local if not Path(s).expanduser().is_file()]
    if missing:
        raise ConfigError(f"{key}: {len(missing)} of {len(shards)} shards do not exist (first: {missing[0]}); "
                          "check the path or the brace pattern.")
    return [str(Path(s).expanduser()) if s in local else s for s in shards]


def decode_image(sample: dict) -> Tensor | None:
    """uint8 [3, H, W] from the first image entry of a webdataset sample, None when it has none; OSError
    when it cannot be decoded."""
    for key in IMAGE_KEYS:
        if key in sample:
            try:
                with open_image(io.BytesIO(sample[key])) as image:
                    return torch.from_numpy(rgb_array(image).copy()).permute(2, 0, 1)
            except Exception as error:  # a decoder fails in many ways on damaged bytes
                raise OSError(one_line(error)) from error
    return None


class ShardStream(IterableDataset):
    """Images streamed from tar shards, cropped like the other sources.

    Each epoch the shard list is shuffled with a seed of (seed, epoch) and dealt out to the readers
    (rank x DataLoader worker), so readers see disjoint shards; within a reader, samples pass through a
    seeded shuffle buffer. A training epoch is `samples_per_epoch` images over all readers: each reader
    serves its equal share, cycling its shards if needed, so that all ranks take the same number of
    steps. Validation is split by sample, not by shard (see `samples`).
    """

    def __init__(self, shards: list[str], crop_size: int, train: bool, seed: int, random_flip: bool,
                 augment: str, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000,
                 samples_per_epoch: int | None = None, on_bad_file: str = "skip",
                 bad_files: BadFiles | None = None) -> None:
        self.shards = shards
        self.crop_size = crop_size
        self.train = train
        self.seed = seed
        self.random_flip = random_flip and train
        self.augment = augment
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.epoch = 0
        self.channels = 3
        self.on_bad_file = on_bad_file
        self.bad_files = bad_files

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def readers(self) -> tuple[int, int]:
        """(this reader's id, number of readers): one reader per rank and DataLoader worker."""
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        return self.rank * workers + worker_id, self.world_size * workers

    def samples(self, epoch: int) -> Iterator[dict]:
        """Training: this reader's shards of the epoch's shuffled shard list, through a shuffle buffer.
        Validation: every shard, keeping every readers-th sample (small sets; no sample twice or dropped)."""
        import webdataset as wds

        reader, readers = self.readers()
        if not self.train:
            pipeline = wds.DataPipeline(wds.SimpleShardList(self.shards), wds.tarfile_to_samples())
            return (sample for i, sample in enumerate(pipeline) if i % readers == reader)
        if len(self.shards) < readers:
            raise RuntimeError(f"data.urls has {len(self.shards)} shards but there are {readers} readers "
                               f"({self.world_size} processes x {readers // self.world_size} workers); use at "
                               "least one shard per reader (more shards, or fewer data.num_workers).")
        order = list(self.shards)
        random.Random(stable_seed("shards", self.seed, epoch)).shuffle(order)
        stages = [wds.SimpleShardList(order[reader::readers]), wds.tarfile_to_samples()]
        if self.shuffle_buffer > 1:
            rng = random.Random(stable_seed("samples", self.seed, epoch, reader))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng))
        return iter(wds.DataPipeline(*stages))

    def crop(self, image: Tensor, key: str) -> Tensor:
        if not self.train:
            return to_unit_float(evaluation_view(image, self.crop_size))
        image = grow_to_fit(image, self.crop_size)
        rng = random.Random(stable_seed("crop", self.seed, key))
        augment = paper_augment if self.augment == "paper" else random_crop
        return to_unit_float(augment(image, self.crop_size, rng, self.random_flip))

    def __iter__(self) -> Iterator[Tensor]:
        epoch, served = self.epoch, 0
        _, readers = self.readers()
        quota = None if self.samples_per_epoch is None else self.samples_per_epoch // readers
        while True:
            yielded_this_pass = 0
            for sample in self.samples(epoch):
                try:
                    image = decode_image(sample)
                except OSError as error:  # like a bad file of data=folder: skipped and listed, or the run stops
                    where = f"{sample.get('__url__')}:{sample.get('__key__')}"
                    if self.on_bad_file == "error":
                        raise UnreadableImage(f"could not read the image of sample {where} ({error}); fix the shard, "
                                              "or set data.on_bad_file=skip to skip such samples") from None
                    if self.bad_files is not None:
                        self.bad_files.record(where, str(error))
                    continue
                if image is None:
                    continue
                yield self.crop(image, f"{epoch}:{sample.get('__url__')}:{sample.get('__key__')}")
                served += 1
                yielded_this_pass += 1
                if quota is not None and served >= quota:
                    return
            if quota is None or yielded_this_pass == 0:
                return
            epoch += 1  # cycle this reader's shards until its share of the epoch is served


class StreamLoader(DataLoader):
    """A DataLoader over a `ShardStream` that tells it the epoch before each pass (Lightning sets epochs
    on samplers only, and the workers hold copies of the stream), and that Lightning checkpoints: a
    resumed run restarts the epoch it was in, from the beginning of that epoch's shard order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def __iter__(self):
        self.dataset.set_epoch(self.epoch)
        self.epoch += 1
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": max(0, self.epoch - 1)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]


def build_webdataset(urls, val_urls, crop_size: int, train_samples: int, seed: int, random_flip: bool,
                     augment: str, shuffle_buffer: int, on_bad_file: str = "skip",
                     bad_files: BadFiles | None = None) -> tuple[ShardStream, ShardStream]:
    """Streams for training and validation; the rank split is applied by the data module."""
    train = expand_shards(urls, "data.urls")
    val = expand_shards(val_urls, "data.val_urls") if val_urls else train[-1:]
    if not val_urls and len(train) < 2:
        raise ConfigError("data.urls has a single shard and data.val_urls is not set; give validation shards "
                          "(data.val_urls=...) or more training shards (the last one is then held out).")
    if not val_urls:
        train = train[:-1]
    options = {"on_bad_file": on_bad_file, "bad_files": bad_files}
    return (ShardStream(train, crop_size, True, seed, random_flip, augment, shuffle_buffer=shuffle_buffer,
                        samples_per_epoch=train_samples, **options),
            ShardStream(val, crop_size, False, seed, False, "crop", **options))
