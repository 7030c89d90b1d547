"""Data at scale and bad data: the rank split, resuming inside an epoch, the cached folder index, unreadable
files, tar shards, ImageNet / CelebA layouts and the paper's augmentation. Every fixture is built here."""

from __future__ import annotations

import gc
import io
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import dvae.data.folder as folder_module
from dvae.data.datamodule import DVAEDataModule
from dvae.data.folder import FolderImages
from dvae.data.samplers import EpochSampler
from dvae.data.transforms import item_rng, paper_augment
from dvae.data.webdataset import ShardStream
from dvae.errors import ConfigError
from tests.data.test_sources import no_md5_check, write_cifar10  # noqa: F401  (a fixture)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def write_pngs(root: Path, count: int, size: int = 24) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = root / f"sub{i % 3}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size + i % 5, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def on_rank(dm: DVAEDataModule, rank: int, world: int) -> DVAEDataModule:
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    return dm


def served_indices(dm: DVAEDataModule, epoch: int = 0) -> list[int]:
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(epoch)
    return list(sampler)


# --- the rank split -----------------------------------------------------------------------------------------


def test_epoch_sampler_deals_one_permutation_to_the_ranks():
    for n, world in ((10, 2), (11, 2), (12, 3)):
        shares = [list(EpochSampler(n, seed=0, rank=r, world_size=world)) for r in range(world)]
        assert len({len(share) for share in shares}) == 1  # the same number of steps on every rank
        seen = [i for share in shares for i in share]
        assert len(seen) == len(set(seen)) == n - n % world  # disjoint, and only the short tail is left out
        assert set(seen) <= set(range(n))


@pytest.mark.parametrize("source", ["folder", "cifar10"])
def test_each_epoch_sees_every_sample_once_split_over_two_ranks(source, tmp_path, no_md5_check):  # noqa: F811
    if source == "folder":
        write_pngs(tmp_path / "images", 20)
        options = dict(root=str(tmp_path / "images"), crop_size=16, val_fraction=0.2, train_samples=16)
    else:
        write_cifar10(tmp_path / "cifar")
        options = dict(root=str(tmp_path / "cifar"), crop_size=16, train_samples=20)
    ranks = [on_rank(DVAEDataModule(source, batch_size=4, **options), r, 2) for r in range(2)]
    num = len(ranks[0].train_set)
    for epoch in (0, 1):
        shares = [served_indices(dm, epoch) for dm in ranks]
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == list(range(epoch * num, (epoch + 1) * num))
    assert ranks[0].train_dataloader().batch_size == 2  # the global batch of 4 over 2 ranks
    val = [list(dm.val_dataloader().sampler) for dm in ranks]
    assert sorted(val[0] + val[1]) == list(range(len(ranks[0].val_set)))  # no padding, nothing dropped


def test_a_global_batch_that_does_not_split_is_refused(tmp_path):
    dm = on_rank(DVAEDataModule("shapes", batch_size=6, train_samples=32), 0, 4)
    with pytest.raises(ConfigError, match="data.batch_size=6 is the global batch .* 4 processes"):
        dm.train_dataloader()


# --- resuming inside an epoch -------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_resumes_inside_an_epoch_and_across_the_boundary(workers):
    def make():
        return DVAEDataModule("shapes", crop_size=8, batch_size=4, train_samples=16, num_workers=workers)

    reference = make().train_dataloader()
    expected = []
    for epoch in range(2):
        reference.sampler.set_epoch(epoch)
        expected += list(reference)  # 4 batches per epoch
    for stop in (1, 3, 4):  # inside the first epoch, at its last batch, at the boundary
        loader = make().train_dataloader()
        loader.sampler.set_epoch(0)
        iterator = iter(loader)
        for _ in range(stop):
            next(iterator)
        state = loader.state_dict()
        del iterator
        resumed = make().train_dataloader()
        resumed.load_state_dict(state)
        rest = list(resumed)  # what Lightning then iterates: the rest of that epoch
        resumed.sampler.set_epoch(state["epoch"] + 1)
        rest += list(resumed)
        assert len(rest) == len(expected) - stop
        assert all(torch.equal(a, b) for a, b in zip(rest, expected[stop:]))


def test_resuming_with_another_world_size_is_refused():
    state = DVAEDataModule("shapes", batch_size=4, train_samples=16).train_dataloader().state_dict()
    other = on_rank(DVAEDataModule("shapes", batch_size=4, train_samples=16), 0, 2).train_dataloader()
    with pytest.raises(ValueError, match="same trainer.devices"):
        other.load_state_dict(state)


# --- the folder index ---------------------------------------------------------------------------------------


def test_the_folder_index_is_reused_and_rebuilt_on_request(tmp_path, monkeypatch):
    root = tmp_path / "images"
    write_pngs(root, 6)
    first = DVAEDataModule("folder", root=str(root), batch_size=2, train_samples=4)

    def no_walk(*args):
        raise AssertionError("the folder was walked again")

    real_walk = folder_module.walk_images
    monkeypatch.setattr(folder_module, "walk_images", no_walk)
    second = DVAEDataModule("folder", root=str(root), batch_size=2, train_samples=4)
    assert second.train_set.files == first.train_set.files
    write_pngs(root / "sub0" / "deeper", 2)  # a change below the root: the index is not stale by mtime
    monkeypatch.setattr(folder_module, "walk_images", real_walk)
    assert len(DVAEDataModule("folder", root=str(root), batch_size=2, train_samples=4).train_set.files) + len(
        first.val_set.files) == 6
    rescanned = DVAEDataModule("folder", root=str(root), batch_size=2, train_samples=4, rescan=True)
    assert len(rescanned.train_set.files) + len(rescanned.val_set.files) == 8
    (root / "new.png").write_bytes((root / "sub0" / "img000.png").read_bytes())  # the root changes: rebuilt
    rebuilt = DVAEDataModule("folder", root=str(root), batch_size=2, train_samples=4)
    assert len(rebuilt.train_set.files) + len(rebuilt.val_set.files) == 9


# --- bad files ----------------------------------------------------------------------------------------------


def bad_folder(root: Path) -> dict[str, Path]:
    """Good images of every awkward kind, and three bad files."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    files = {}

    def save(name, image):
        files[name] = root / name
        image.save(files[name])

    save("rgb.png", Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    save("grey.png", Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L"))
    save("palette.png", Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("P"))
    save("rgba.png", Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA"))
    save("deep.png", Image.fromarray(rng.integers(0, 65536, (32, 32), dtype=np.uint16)))
    save("tiny.png", Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)))
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(good, format="PNG")
    files["truncated.png"] = root / "truncated.png"
    files["truncated.png"].write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    files["garbage.jpg"] = root / "garbage.jpg"
    files["garbage.jpg"].write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    files["text.png"] = root / "text.png"
    files["text.png"].write_text("this is not an image")
    return files


BAD = ("truncated.png", "garbage.jpg", "text.png")


def every_image(dm: DVAEDataModule) -> list[torch.Tensor]:
    return [dataset[i] for dataset in (dm.train_set, dm.val_set) for i in range(dataset.num_images)]


def test_bad_files_are_skipped_named_and_counted_and_odd_images_converted(tmp_path):
    files = bad_folder(tmp_path / "images")
    dm = DVAEDataModule("folder", root=str(tmp_path / "images"), crop_size=16, batch_size=2, train_samples=8,
                        val_fraction=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = every_image(dm)
    assert all(image.shape == (3, 16, 16) and image.dtype == torch.float32 for image in images)
    messages = [str(w.message) for w in caught]
    for name in BAD:
        assert sum(str(files[name]) in m and m.startswith("skipping") for m in messages) == 1, (name, messages)
    assert any("tiny.png is 9x6, smaller than data.crop_size=16; it is resized up" in m for m in messages)
    assert sorted(Path(path).name for path, _ in dm.bad_files()) == sorted(BAD)
    assert not any(name in m for m in messages for name in ("grey", "palette", "rgba", "deep"))


def test_only_a_training_image_smaller_than_the_crop_is_reported_as_resized_up(tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((6, 9, 3), dtype=np.uint8)).save(tiny)
    for train, expected in ((True, 1), (False, 0)):  # validation resizes every image to the crop anyway
        images = FolderImages([tiny], crop_size=16, train=train, seed=0, random_flip=False, min_length=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert images[0].shape == (3, 16, 16)
        assert sum("resized up" in str(w.message) for w in caught) == expected, (train, caught)


def test_bad_files_found_by_workers_are_reported_to_the_main_process(tmp_path):
    bad_folder(tmp_path / "images")
    dm = DVAEDataModule("folder", root=str(tmp_path / "images"), crop_size=16, batch_size=1, train_samples=10,
                        val_fraction=0.2, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            list(loader)
    train_bad = {dm.train_set.files[i].name for i in range(dm.train_set.num_images)} & set(BAD)
    assert {Path(path).name for path, _ in dm.bad_files()} >= train_bad and train_bad


def test_the_bad_files_folder_goes_with_its_datamodule_even_outside_a_run(tmp_path):
    """A datamodule used in a notebook or a test never reaches the run's clean-up; it must not leave a
    dvae-bad-files-* folder in /tmp either. Workers that see the folder never remove it."""
    bad_folder(tmp_path / "images")
    dm = DVAEDataModule("folder", root=str(tmp_path / "images"), crop_size=16, batch_size=1, train_samples=10,
                        val_fraction=0.2, num_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(dm.train_dataloader())
    folder = dm.bad_file_log.folder
    assert folder.is_dir() and dm.bad_files(), "the worker's entries reach the main process"
    del dm
    gc.collect()
    assert not folder.exists()


def test_on_bad_file_error_names_the_file(tmp_path):
    files = bad_folder(tmp_path / "images")
    dm = DVAEDataModule("folder", root=str(tmp_path / "images"), crop_size=16, batch_size=2, train_samples=8,
                        on_bad_file="error", val_fraction=0.2)
    with pytest.raises(RuntimeError, match="could not read image .*set data.on_bad_file=skip") as error:
        every_image(dm)
    assert any(str(files[name]) in str(error.value) for name in BAD)


# --- tar shards ---------------------------------------------------------------------------------------------


def write_shards(root: Path, shards: int, per_shard: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    paths = []
    for s in range(shards):
        path = root / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                buffer = io.BytesIO()
                # the sample's number is written into its pixels, so the test can tell samples apart
                array = np.full((20, 20, 3), s * per_shard + i, dtype=np.uint8)
                array[..., 1] = rng.integers(0, 256, (20, 20))
                Image.fromarray(array).save(buffer, format="PNG")
                info = tarfile.TarInfo(f"s{s}_{i:04d}.png")
                info.size = len(buffer.getvalue())
                tar.addfile(info, io.BytesIO(buffer.getvalue()))
        paths.append(str(path))
    return paths


def sample_ids(images) -> list[int]:
    return [int(round(float(image[0].mean()) * 255)) for image in images]


def test_two_ranks_stream_disjoint_shards_and_together_see_every_sample(tmp_path):
    shards = write_shards(tmp_path, shards=2, per_shard=6)
    per_rank = []
    for rank in range(2):
        stream = ShardStream(shards, crop_size=16, train=True, seed=0, random_flip=False, augment="crop",
                             rank=rank, world_size=2, shuffle_buffer=4, samples_per_epoch=12)
        stream.set_epoch(0)
        per_rank.append(sample_ids(stream))
    assert len(per_rank[0]) == len(per_rank[1]) == 6
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(12))


def test_webdataset_validation_sees_images_by_the_evaluation_rule(tmp_path):
    """Shard validation resizes and centre-crops like folder validation, dvae-eval and dvae-encode."""
    from dvae.data.image_files import read_rgb
    from dvae.data.transforms import evaluation_view, to_unit_float

    (shard,) = write_shards(tmp_path, shards=1, per_shard=2)
    stream = ShardStream([shard], crop_size=12, train=False, seed=0, random_flip=False, augment="crop")
    served = list(stream)
    with tarfile.open(shard) as tar:
        tar.extractall(tmp_path / "files", filter="data")
    for image, name in zip(served, ("s0_0000.png", "s0_0001.png")):
        assert torch.equal(image, to_unit_float(evaluation_view(read_rgb(tmp_path / "files" / name), 12)))


def test_webdataset_source_through_the_data_module(tmp_path):
    shards = write_shards(tmp_path, shards=3, per_shard=4)  # the last shard is held out for validation
    pattern = str(tmp_path / "shard-{000..002}.tar")
    ranks = [on_rank(DVAEDataModule("webdataset", urls=pattern, crop_size=16, batch_size=4, train_samples=8), r, 2)
             for r in range(2)]
    seen = [sample_ids(torch.cat(list(dm.train_dataloader()))) for dm in ranks]
    assert len(seen[0]) == len(seen[1]) == 4 and not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(8))
    val = [sample_ids(torch.cat(list(dm.val_dataloader()))) for dm in ranks]
    assert sorted(val[0] + val[1]) == list(range(8, 12))  # validation split by sample: each once
    with pytest.raises(ConfigError, match="data.urls: 1 of 2 shards do not exist"):
        DVAEDataModule("webdataset", urls=f"{shards[0]},{tmp_path / 'missing.tar'}", batch_size=4)
    with pytest.raises(ConfigError, match="data.urls is not set"):
        DVAEDataModule("webdataset", batch_size=4)


# --- ImageNet, CelebA, the paper's augmentation ------------------------------------------------------------------


def test_imagenet_layout_and_errors(tmp_path):
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            write_pngs(tmp_path / split / wnid, 3)
    dm = DVAEDataModule("imagenet", root=str(tmp_path), crop_size=16, batch_size=2, train_samples=4)
    assert dm.train_set.num_images == 6 and dm.val_set.num_images == 6
    assert next(iter(dm.train_dataloader())).shape == (2, 3, 16, 16)
    with pytest.raises(ConfigError, match="has no train/ directory"):
        DVAEDataModule("imagenet", root=str(tmp_path / "val"), batch_size=2)


def test_celeba_missing_root_names_the_layout(tmp_path):
    with pytest.raises(ConfigError, match=r"data.root needs .*img_align_celeba"):
        DVAEDataModule("celeba", root=str(tmp_path), batch_size=2)


def test_paper_augmentation_resizes_then_crops():
    # A 64x48 image whose columns count up: a plain 16 crop keeps a step of 1 per pixel; the paper's
    # augmentation first shrinks the 48x48 square to 18..24 px, so the step grows to 2..2.7.
    image = torch.arange(64, dtype=torch.uint8).repeat(3, 48, 1) * 3
    for index in range(20):
        out = paper_augment(image, 16, item_rng("test", index), flip=False)
        assert out.shape == (3, 16, 16)
        step = (out[0, 8, 1:].float() - out[0, 8, :-1].float()).mean()
        assert 3 * 48 / 24 - 0.5 <= step <= 3 * 48 / 18 + 0.5
    again = [paper_augment(image, 16, item_rng("a", 1), True) for _ in range(2)]
    assert torch.equal(*again)
