"""The files a data set reads: damaged images anywhere (all of them, the validation split, on_bad_file=error),
symlinked folders, FIFOs and other non-regular files, and float / 16-bit / 32-bit images. Every fixture is
written here, and every file the user had is byte-for-byte unchanged afterwards."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data._utils.worker import ExceptionWrapper

from dvae.cli.train import main
from dvae.data.datamodule import DVAEDataModule
from dvae.data.folder import hash_order, split_by_hash, walk_images
from dvae.data.image_files import UnreadableImage, read_rgb
from dvae.errors import ConfigError, TrainingError
from dvae.training.run import train
from tests.conftest import FAST, compose_config, one_sentence_error
from tests.data.test_scale import write_shards


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def write_images(root: Path, count: int, size: int = 20) -> list[Path]:
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"img{i}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return paths


def damage(path: Path) -> None:
    path.write_bytes(b"this is not an image")


def by_hash(root: Path) -> list[Path]:
    """The files under `root` in the order in which they go to validation."""
    return hash_order([p for p in root.rglob("*") if p.is_file()], root)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def folder(root: Path, **options) -> DVAEDataModule:
    return DVAEDataModule("folder", root=str(root), crop_size=16, batch_size=2, train_samples=8, **options)


def check_sentence(message: str, *names: str) -> None:
    assert message.endswith(".") and "\n" not in message and "Traceback" not in message, message
    assert all(name in message for name in names), (names, message)


# --- damaged images: refused before training, or skipped and listed ----------------------------------------


def all_damaged(root):
    for path in write_images(root, 3):
        damage(path)
    return "none of the 3 image files", str(root / "img"), "data.root"


def one_readable(root):
    for path in write_images(root, 3)[1:]:
        damage(path)
    return "only 1 of the 3 image files", "at least 2", "data.root"


def error_policy_at_a_split_head(root):
    write_images(root, 4)
    damage(by_hash(root)[0])
    return "data.on_bad_file=error", str(by_hash(root)[0]), "data.on_bad_file=skip"


@pytest.mark.parametrize("make, options", [
    (all_damaged, {}),
    (one_readable, {}),
    (error_policy_at_a_split_head, {"on_bad_file": "error"}),
])
def test_a_folder_without_enough_readable_images_is_refused_in_one_sentence(tmp_path, make, options):
    root = tmp_path / "images"
    names = make(root)
    before = snapshot(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused folder gets the sentence only, no warnings before it
        with pytest.raises(ConfigError) as error:
            folder(root, **options)
    check_sentence(str(error.value), *names)
    assert snapshot(root) == before


def test_an_imagenet_split_without_a_readable_image_is_refused(tmp_path):
    root = tmp_path / "imagenet"
    write_images(root / "train" / "n01440764", 2)
    for path in write_images(root / "val" / "n01440764", 2):
        damage(path)
    before = snapshot(root)
    with pytest.raises(ConfigError) as error:
        DVAEDataModule("imagenet", root=str(root), crop_size=16, batch_size=2, train_samples=4)
    check_sentence(str(error.value), "none of the 2 images of the val split", f"data.root={root}")
    assert snapshot(root) == before


def test_dvae_train_refuses_a_folder_of_damaged_images_with_exit_2(tmp_path, capsys, monkeypatch):
    all_damaged(tmp_path / "images")
    before = snapshot(tmp_path / "images")
    monkeypatch.setattr(sys, "argv", ["dvae-train", "data=folder", f"data.root={tmp_path / 'images'}",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert "none of the 3 image files" in one_sentence_error(capsys, "dvae-train")
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoints").exists()
    assert snapshot(tmp_path / "images") == before


def test_a_damaged_validation_split_is_replaced_and_listed(tmp_path):
    # The only validation image is damaged: the split moves on to the next file by hash (this used to
    # fail at the first validation, after training had started).
    root = tmp_path / "images"
    write_images(root, 5)
    val_head = by_hash(root)[0]
    damage(val_head)
    before = snapshot(root)
    dm = folder(root, val_fraction=0.05)
    assert len(dm.val_set.files) == 1 and val_head not in dm.val_set.files + dm.train_set.files
    assert all_val_images(dm).shape == (1, 3, 16, 16)
    assert [Path(path) for path, _ in dm.bad_files()] == [val_head]
    assert snapshot(root) == before


def all_val_images(dm: DVAEDataModule) -> torch.Tensor:
    return torch.cat(list(dm.val_dataloader()))


def test_a_run_with_damaged_validation_images_finishes_and_lists_them(tmp_path, capsys, monkeypatch):
    # The whole validation split is damaged (this used to stop the run at its first validation, before
    # any checkpoint): it is dropped before training and the next files by hash take its place. Of
    # those, the second in reading order is damaged too: validation skips it and serves the next image.
    root = tmp_path / "images"
    files = write_images(root, 8)
    ranked = hash_order(files, root)
    assert sorted(ranked[:3]) == split_by_hash(files, root, val_fraction=0.4)[1]
    late = sorted(ranked[3:5])[1]
    for path in [*ranked[:3], late]:
        damage(path)
    before = snapshot(root)
    scratch = tmp_path / "tmp"  # where the run keeps its list of skipped files while it trains
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert folder(root, val_fraction=0.4).val_set.files == sorted(ranked[3:5])  # `late`: read in the run
        probes = set(scratch.glob("dvae-bad-files-*"))
        cfg = compose_config([*(o for o in FAST if not o.startswith("data.val_samples")), "data=folder",
                              f"data.root={root}", "data.crop_size=16", "data.num_workers=0", "data.val_fraction=0.4"])
        train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    listed = (tmp_path / "run" / "bad_files.txt").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]) for line in listed) == sorted([*ranked[:3], late])
    assert metrics["bad_files"] == 4 and metrics["val_images"] == 2
    assert "4 unreadable file(s) were skipped" in capsys.readouterr().err
    assert snapshot(root) == before
    assert set(scratch.glob("dvae-bad-files-*")) == probes  # the run removed its own list of skipped files


def test_on_bad_file_error_mid_run_is_one_sentence_naming_the_file_and_the_checkpoint(tmp_path):
    root = tmp_path / "images"
    write_images(root, 6)
    late = folder(root).train_set.files[-1]  # not read before training: only the head of each split is
    damage(late)
    before = snapshot(root)
    cfg = compose_config([*(o for o in FAST if not o.startswith("data.val_samples")), "data=folder",
                          f"data.root={root}", "data.crop_size=16", "data.num_workers=0", "data.on_bad_file=error"])
    with pytest.raises(TrainingError) as error:
        train(cfg, tmp_path / "run")
    check_sentence(str(error.value), f"could not read image {late}", "data.on_bad_file=skip",
                   "no checkpoint was written")
    cause = error.value.__cause__
    assert isinstance(cause, UnreadableImage) and cause.__cause__ is None and cause.__suppress_context__
    assert snapshot(root) == before


def test_an_error_from_a_loader_worker_keeps_only_its_sentence():
    try:
        raise UnreadableImage("could not read image /data/x.png (damaged); fix or remove it")
    except UnreadableImage:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(UnreadableImage) as error:
        wrapper.reraise()  # what the main process does with a worker's exception
    assert str(error.value) == "could not read image /data/x.png (damaged); fix or remove it"


def test_a_damaged_sample_in_a_shard_is_skipped_and_listed_or_stops_in_one_sentence(tmp_path):
    shards = write_shards(tmp_path, shards=2, per_shard=3)
    with tarfile.open(shards[1], "a") as tar:  # the validation shard gets a damaged image
        info = tarfile.TarInfo("broken_0000.png")
        info.size = len(b"not a png")
        tar.addfile(info, io.BytesIO(b"not a png"))
    before = snapshot(tmp_path)
    dm = DVAEDataModule("webdataset", urls=shards, crop_size=16, batch_size=2, train_samples=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.cat(list(dm.val_dataloader())).shape == (3, 3, 16, 16)
    assert [path for path, _ in dm.bad_files()] == [f"{shards[1]}:broken_0000"]
    strict = DVAEDataModule("webdataset", urls=shards, crop_size=16, batch_size=2, train_samples=2,
                            on_bad_file="error")
    with pytest.raises(UnreadableImage) as error:
        list(strict.val_dataloader())
    check_sentence(f"{error.value}.", f"sample {shards[1]}:broken_0000", "data.on_bad_file=skip")
    assert snapshot(tmp_path) == before


# --- symlinks and non-regular files ------------------------------------------------------------------------


def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "elsewhere"
    real = write_images(root / "real", 2)
    linked = write_images(outside, 1)
    (root / "a_link_to_real").symlink_to(root / "real")  # walked after the real one: not listed twice
    (root / "outside").symlink_to(outside)
    (root / "real" / "loop").symlink_to(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files, _ = walk_images(root)
    assert files == sorted([*real, root / "outside" / linked[0].name])
    messages = [str(w.message) for w in caught]
    assert any(f"{root / 'a_link_to_real'} leads to {root / 'real'}" in m for m in messages), messages
    assert any(f"{root / 'real' / 'loop'} leads to {root}" in m for m in messages), messages
    assert len(folder(root).train_set.files + folder(root).val_set.files) == 3


def test_non_regular_files_are_never_opened(tmp_path):
    root = tmp_path / "images"
    write_images(root, 3)
    os.mkfifo(root / "fifo.png")
    (root / "broken.png").symlink_to(tmp_path / "missing.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = folder(root)
    assert {p.name for p in dm.train_set.files + dm.val_set.files} == {"img0.png", "img1.png", "img2.png"}
    assert any("2 image name(s)" in str(w.message) and "not regular files" in str(w.message) for w in caught)
    # A stale index may still list a FIFO: reading it fails at once instead of waiting for a writer.
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(OSError, read_rgb, root / "fifo.png")),
                              daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert outcome and "not a regular file" in str(outcome[0].value)


# --- pixel formats -----------------------------------------------------------------------------------------

RAMP = np.linspace(0, 1, 6 * 8).reshape(6, 8)
RGB_RAMP = np.stack([RAMP, 1 - RAMP, RAMP / 2], axis=-1)


def pil(array, mode=None):
    return lambda path: Image.fromarray(array, mode).save(path)


def tiff(array, **options):
    return lambda path: tifffile.imwrite(path, array, **options)


@pytest.mark.parametrize("name, write, expected", [
    ("float32.tif", pil(RAMP.astype(np.float32), "F"), RAMP),  # Pillow mode F: used to load as black
    ("float32-rgb.tif", tiff(RGB_RAMP.astype(np.float32)), RGB_RAMP),  # Pillow cannot open it
    ("float32-planar.tif", tiff(RGB_RAMP.transpose(2, 0, 1).astype(np.float32), planarconfig="separate",
                                photometric="rgb"), RGB_RAMP),
    ("float64.tif", tiff(RAMP), RAMP),
    ("float-out-of-range.tif", pil((RAMP * 3 - 1).astype(np.float32), "F"), (RAMP * 3 - 1).clip(0, 1)),
    ("uint16.png", pil((RAMP * 65535).astype(np.uint16)), RAMP),  # Pillow mode I;16
    ("uint16.tif", tiff((RAMP * 65535).astype(np.uint16)), RAMP),
    ("uint16-rgb.tif", tiff((RGB_RAMP * 65535).astype(np.uint16)), RGB_RAMP),
    ("int32-16bit.tif", pil((RAMP * 65535).astype(np.int32), "I"), RAMP),  # Pillow mode I
    ("int32.tif", pil((RAMP * (2**31 - 1)).astype(np.int32), "I"), RAMP),
    ("uint8-grey.png", pil((RAMP * 255).round().astype(np.uint8)), RAMP),
])
def test_images_of_every_depth_are_scaled_by_their_value_range(tmp_path, name, write, expected):
    write(tmp_path / name)
    image = read_rgb(tmp_path / name)
    if expected.ndim == 2:
        expected = np.repeat(expected[..., None], 3, axis=-1)
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 8)
    difference = image.permute(1, 2, 0).numpy().astype(int) - np.rint(expected * 255).astype(int)
    assert np.abs(difference).max() <= 1, image


def test_decoded_images_keep_the_most_recent_within_the_bound():
    from dvae.data.folder import DecodedImages

    reads = []

    def reader(key, size):
        return lambda: reads.append(key) or torch.zeros(size, dtype=torch.uint8)

    cache = DecodedImages(max_bytes=250)
    for key in (0, 1, 0, 2):  # 100 bytes each: 0 and 1, then 0 used again, then 2 pushes out 1 (least recent)
        cache.get(key, reader(key, 100))
    assert reads == [0, 1, 2] and list(cache.images) == [0, 2] and cache.bytes == 200
    cache.get(1, reader(1, 100))
    assert reads == [0, 1, 2, 1] and list(cache.images) == [2, 1]
    big = cache.get(9, reader(9, 300))  # larger than the whole bound: served, not kept, nothing pushed out
    assert big.numel() == 300 and list(cache.images) == [2, 1] and cache.bytes == 200


def test_a_cached_folder_serves_the_same_crops_and_reads_each_file_once(tmp_path, monkeypatch):
    import dvae.data.folder

    write_images(tmp_path / "images", 6, size=40)
    counted = []
    monkeypatch.setattr(dvae.data.folder, "read_rgb", lambda path: counted.append(path) or read_rgb(path))
    batches = {}
    for mb in (0, 1):
        counted.clear()
        dm = DVAEDataModule("folder", root=str(tmp_path / "images"), crop_size=16, batch_size=4, train_samples=24,
                            val_fraction=0.3, cache_mb=mb)
        counted.clear()  # the files read before training (FileCheck) are not served crops
        batches[mb] = [torch.cat(list(dm.train_dataloader())), torch.cat(list(dm.val_dataloader()))]
        reads = len(counted)
    assert reads == 6  # with the cache: each of the 6 files once, for 24 crops and the validation set
    for plain, cached in zip(*batches.values()):
        assert torch.equal(plain, cached)


@pytest.mark.parametrize("options, words", [({"cache_mb": -1}, "data.cache_mb=-1"),
                                            ({"cache_mb": "lots"}, "data.cache_mb='lots'")])
def test_a_bad_cache_size_is_one_sentence(tmp_path, options, words):
    write_images(tmp_path / "images", 3)
    with pytest.raises(ConfigError) as error:
        folder(tmp_path / "images", **options)
    check_sentence(str(error.value), words)


def test_the_cache_is_refused_for_a_source_without_image_files():
    with pytest.raises(ConfigError) as error:
        DVAEDataModule("photos", cache_mb=64)
    check_sentence(str(error.value), "data.cache_mb", "data=photos")
