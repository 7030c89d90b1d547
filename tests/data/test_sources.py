"""dvae.data: every source yields float32 [C, crop, crop] in [0, 1], deterministically, and bad configs
fail in the DataModule's __init__ with a ConfigError that names the key."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from dvae.data.datamodule import DVAEDataModule, build_datamodule
from dvae.data.image_files import IMAGE_EXTENSIONS
from dvae.data.photos import TRAIN_PHOTOS, VAL_PHOTOS
from dvae.data.samplers import EpochSampler
from dvae.errors import ConfigError

SMALL = dict(batch_size=8, train_samples=32, val_samples=16)


def first_train_batch(dm: DVAEDataModule) -> torch.Tensor:
    return next(iter(dm.train_dataloader()))


def all_val(dm: DVAEDataModule) -> torch.Tensor:
    return torch.cat(list(dm.val_dataloader()))


def check_batch(batch: torch.Tensor, channels: int, size: int, count: int) -> None:
    assert isinstance(batch, torch.Tensor)
    assert batch.shape == (count, channels, size, size)
    assert batch.dtype == torch.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0


def check_one_sentence(error: pytest.ExceptionInfo) -> None:
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert message.endswith(".") and ". " not in message and "\n" not in message, message


def check_deterministic(make) -> None:
    """Same seed: same first training batch and validation set; another seed: another training batch."""
    a, b, other = make(0), make(0), make(1)
    assert torch.equal(first_train_batch(a), first_train_batch(b))
    assert torch.equal(all_val(a), all_val(b))
    assert not torch.equal(first_train_batch(a), first_train_batch(other))
    # Validation ignores the seed so that runs with different seeds are compared on the same images.
    assert torch.equal(all_val(a), all_val(other))


# --- photos ----------------------------------------------------------------------------------------------


def test_photos_batches():
    dm = DVAEDataModule("photos", crop_size=32, **SMALL)
    assert dm.channels == 3
    train = first_train_batch(dm)
    check_batch(train, 3, 32, 8)
    assert train.std() > 0.02  # real content, not a constant
    val = all_val(dm)
    check_batch(val, 3, 32, 16)
    assert len(dm.train_dataloader()) == 32 // 8


def test_photos_validation_photos_are_held_out():
    dm = DVAEDataModule("photos", **SMALL)
    assert set(dm.train_set.names) == set(TRAIN_PHOTOS)
    assert set(dm.val_set.names) == set(VAL_PHOTOS)
    assert not set(TRAIN_PHOTOS) & set(VAL_PHOTOS)
    # The stereo pair shows the same scene: both on the same side.
    assert {"motorcycle_left.png", "motorcycle_right.png"} <= set(TRAIN_PHOTOS)


def test_photos_deterministic():
    check_deterministic(lambda seed: DVAEDataModule("photos", seed=seed, **SMALL))


def test_photos_new_crops_every_epoch():
    loader = DVAEDataModule("photos", **SMALL).train_dataloader()
    epoch0, epoch1 = next(iter(loader)), next(iter(loader))
    assert not torch.equal(epoch0, epoch1)
    loader.sampler.set_epoch(0)  # what Lightning does, also after resuming: epoch 0 again
    assert torch.equal(next(iter(loader)), epoch0)


def test_photos_same_batches_with_workers():
    a = DVAEDataModule("photos", num_workers=0, **SMALL)
    b = DVAEDataModule("photos", num_workers=1, **SMALL)
    assert torch.equal(first_train_batch(a), first_train_batch(b))


def test_photos_crop_larger_than_photos():
    with pytest.raises(ConfigError, match="data.crop_size") as error:
        DVAEDataModule("photos", crop_size=512, **SMALL)
    check_one_sentence(error)


def test_photos_min_scale_one():
    dm = DVAEDataModule("photos", min_scale=1.0, crop_size=16, **SMALL)
    check_batch(first_train_batch(dm), 3, 16, 8)
    with pytest.raises(ConfigError, match="data.min_scale"):
        DVAEDataModule("photos", min_scale=0.0, **SMALL)


# --- shapes ----------------------------------------------------------------------------------------------


def test_shapes_batches_and_determinism():
    dm = DVAEDataModule("shapes", crop_size=24, **SMALL)
    assert dm.channels == 3
    check_batch(first_train_batch(dm), 3, 24, 8)
    check_batch(all_val(dm), 3, 24, 16)
    assert torch.equal(dm.val_set[3], dm.val_set[3])
    batched = torch.stack(dm.val_set.__getitems__([1, 2]))
    assert torch.equal(batched, torch.stack([dm.val_set[1], dm.val_set[2]]))
    check_deterministic(lambda seed: DVAEDataModule("shapes", seed=seed, **SMALL))


def test_shapes_train_and_val_differ():
    dm = DVAEDataModule("shapes", **SMALL)
    train = torch.stack(dm.train_set.__getitems__(list(range(16))))
    assert not any(torch.equal(t, v) for t in train for v in all_val(dm))


def test_shapes_have_hard_edges_and_flat_regions():
    images = all_val(DVAEDataModule("shapes", **SMALL))
    steps = torch.cat([(images[..., 1:] - images[..., :-1]).flatten(),
                       (images[..., 1:, :] - images[..., :-1, :]).flatten()]).abs()
    assert (steps == 0).float().mean() > 0.8  # flat colours, no noise, no gradients
    assert (steps > 0.2).sum() > 100  # jumps from one colour to the next, not smeared ramps
    edges = steps[steps > 0]
    assert (edges > 0.05).float().mean() > 0.9  # no antialiasing: almost no small steps
    for image in images:  # at most a background and four shape colours
        assert len(torch.unique(image.flatten(1), dim=1)) <= 5


# --- folder ----------------------------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """Images of many sizes, modes and extensions, nested folders, and files that are not images."""
    rng = np.random.default_rng(0)

    def save(relative: str, mode: str, size: tuple[int, int]) -> None:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)

    save("big.png", "RGB", (120, 90))
    save("a/small.jpg", "RGB", (20, 12))  # smaller than the crop: upscaled
    save("a/grey.png", "L", (50, 40))
    save("a/b/alpha.png", "RGBA", (40, 70))
    save("a/b/UPPER.JPEG", "RGB", (64, 33))
    save("c/bitmap.bmp", "RGB", (33, 33))
    for i in range(6):
        save(f"c/more_{i}.png", "RGB", (40 + 10 * i, 48))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "._hidden.jpg").write_bytes(b"macOS resource fork, not an image")
    return tmp_path


def test_folder_loads_every_image(image_tree: Path):
    dm = DVAEDataModule("folder", root=str(image_tree), crop_size=32, **SMALL)
    assert dm.channels == 3
    files = dm.train_set.files + dm.val_set.files
    assert len(files) == 12 and len(set(files)) == 12
    assert all(not f.name.startswith(".") and f.suffix != ".txt" for f in files)
    for dataset in (dm.train_set, dm.val_set):
        for i in range(dataset.num_images):
            check_batch(dataset[i][None], 3, 32, 1)
    check_batch(first_train_batch(dm), 3, 32, 8)
    assert len(dm.val_set) >= 1
    check_batch(all_val(dm), 3, 32, len(dm.val_set))


def test_folder_split_and_batches_deterministic(image_tree: Path):
    def make(seed: int) -> DVAEDataModule:
        return DVAEDataModule("folder", root=str(image_tree), seed=seed, val_fraction=0.2, **SMALL)

    a, other = make(0), make(1)
    assert a.val_set.files == other.val_set.files  # the split does not depend on the seed
    assert len(a.val_set.files) == round(0.2 * 12)
    check_deterministic(make)


def test_folder_val_fraction_zero_still_holds_out_one(image_tree: Path):
    dm = DVAEDataModule("folder", root=str(image_tree), val_fraction=0.0, **SMALL)
    assert len(dm.val_set) == 1


def test_folder_errors_name_data_root(tmp_path: Path):
    with pytest.raises(ConfigError, match="data.root"):
        DVAEDataModule("folder", root=None, **SMALL)
    with pytest.raises(ConfigError, match="data.root.*does not exist"):
        DVAEDataModule("folder", root=str(tmp_path / "missing"), **SMALL)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="data.root.*not a directory"):
        DVAEDataModule("folder", root=str(tmp_path / "file.png"), **SMALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="data.root.*no image files"):
        DVAEDataModule("folder", root=str(empty), **SMALL)
    text = tmp_path / "text"
    text.mkdir()
    for i in range(3):
        (text / f"{i}.txt").write_text("hello")
    with pytest.raises(ConfigError, match="data.root") as error:
        DVAEDataModule("folder", root=str(text), **SMALL)
    check_one_sentence(error)
    message = str(error.value)
    assert "3 files" in message and all(ext in message for ext in IMAGE_EXTENSIONS)
    Image.new("RGB", (40, 40)).save(text / "only.png")
    with pytest.raises(ConfigError, match="data.root.*only 1 image") as error:
        DVAEDataModule("folder", root=str(text), **SMALL)
    check_one_sentence(error)


# --- mnist, cifar10 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["mnist", "cifar10"])
def test_torchvision_missing_files(tmp_path: Path, source: str):
    with pytest.raises(ConfigError, match="data.download") as error:
        DVAEDataModule(source, root=str(tmp_path), download=False, **SMALL)
    assert "data.root" in str(error.value)
    check_one_sentence(error)


def write_cifar10(root: Path, per_batch: int = 4) -> None:
    """CIFAR-10's python format: pickled dicts of uint8 rows (3072 = 3 x 32 x 32, channel-major)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))


@pytest.fixture
def no_md5_check(monkeypatch):
    """The fixture files are not the real ones, so their md5 sums cannot match."""
    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


def test_cifar10_fixture(tmp_path: Path, no_md5_check):
    write_cifar10(tmp_path)
    dm = DVAEDataModule("cifar10", root=str(tmp_path), batch_size=4, train_samples=8)
    assert dm.channels == 3
    assert dm.train_set.num_images == 20 and len(dm.val_set) == 4
    check_batch(first_train_batch(dm), 3, 32, 4)
    val = all_val(dm)
    check_batch(val, 3, 32, 4)
    # At crop_size 32 the validation images are the stored images themselves.
    stored = datasets.CIFAR10(str(tmp_path), train=False).data  # [N, 32, 32, 3]
    assert torch.equal((val * 255).round().to(torch.uint8), torch.from_numpy(stored).permute(0, 3, 1, 2))
    small = DVAEDataModule("cifar10", root=str(tmp_path), crop_size=16, batch_size=4, train_samples=8)
    check_batch(first_train_batch(small), 3, 16, 4)
    check_deterministic(lambda seed: DVAEDataModule("cifar10", root=str(tmp_path), seed=seed, batch_size=4,
                                                    train_samples=8))


def write_mnist(root: Path, count: int = 6) -> None:
    """MNIST's idx files: big-endian header (magic, sizes) then uint8 data."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        header = struct.pack(">4i", 0x803, count, 28, 28)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">2i", 0x801, count) + labels.tobytes())


def test_mnist_fixture(tmp_path: Path):
    write_mnist(tmp_path)
    dm = DVAEDataModule("mnist", root=str(tmp_path), crop_size=32, batch_size=4, train_samples=8,
                        random_flip=False)
    assert dm.channels == 1
    check_batch(first_train_batch(dm), 1, 32, 4)
    check_batch(all_val(dm), 1, 32, 6)
    check_deterministic(lambda seed: DVAEDataModule("mnist", root=str(tmp_path), seed=seed, batch_size=4,
                                                    train_samples=8))


# --- options ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "key"), [
    (dict(source="laion"), "data.name"),
    (dict(augment="strong"), "data.augment"),
    (dict(on_bad_file="ignore"), "data.on_bad_file"),
    (dict(augment="paper"), "data.augment"),
    (dict(crop_size=4), "data.crop_size"),
    (dict(crop_size=0), "data.crop_size"),
    (dict(crop_size=32.5), "data.crop_size"),
    (dict(batch_size=0), "data.batch_size"),
    (dict(num_workers=-1), "data.num_workers"),
    (dict(train_samples=4, batch_size=8), "data.train_samples"),
    (dict(val_fraction=1.0), "data.val_fraction"),
    (dict(random_flip="yes"), "data.random_flip"),
])
def test_bad_options(options: dict, key: str):
    with pytest.raises(ConfigError, match=key) as error:
        DVAEDataModule(**options)
    check_one_sentence(error)


def test_unknown_source_lists_choices():
    with pytest.raises(ConfigError, match="photos, shapes, folder, mnist, cifar10, celeba, imagenet, webdataset"):
        DVAEDataModule("laion")


def test_build_datamodule_from_config(image_tree: Path):
    dm = build_datamodule({"name": "shapes", "channels": 3, "crop_size": 16, **SMALL}, seed=3)
    assert dm.source == "shapes" and dm.seed == 3 and dm.crop_size == 16
    check_batch(first_train_batch(dm), 3, 16, 8)
    with pytest.raises(ConfigError, match="data.crop_sise"):
        build_datamodule({"name": "shapes", "crop_sise": 16}, seed=0)


def test_build_datamodule_from_omegaconf(image_tree: Path):
    from omegaconf import OmegaConf

    missing_root = OmegaConf.create({"name": "folder", "root": "???", "channels": 3, **SMALL})
    with pytest.raises(ConfigError, match="data.root is not set"):
        build_datamodule(missing_root, seed=0)
    dm = build_datamodule(OmegaConf.create({"name": "folder", "root": str(image_tree), **SMALL}), seed=0)
    check_batch(first_train_batch(dm), 3, 32, 8)


def test_epoch_sampler():
    sampler = EpochSampler(10, seed=0)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10, 20))
    sampler.set_epoch(1)
    assert list(sampler) == epoch1
    assert list(EpochSampler(10, seed=1)) != epoch0
