"""Images for encoding: a file or a data config's split -> float [channels, size, size] crops in [0, 1],
by the evaluation rule validation uses too (`evaluation_view`); and back to 8-bit PNG files."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dvae.data.folder import walk_images
from dvae.data.image_files import IMAGE_EXTENSIONS, read_rgb
from dvae.data.transforms import evaluation_view, to_unit_float
from dvae.errors import ConfigError
from dvae.files import atomic_write

DATA_CONFIGS = ("photos", "shapes", "mnist", "cifar10", "imagenet", "celeba")
SHARDS_REFUSED = ("--data {data}: tar shards are a stream without a fixed list of images; extract the shard to "
                  "evaluate or encode into a folder and pass that folder.")
GREY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma, for 1-channel models


def prepare_image(image: Tensor, size: int, channels: int = 3) -> Tensor:
    """uint8 [3, H, W] -> float [channels, size, size] in [0, 1] by `evaluation_view`, the rule validation uses
    too: what dvae-encode and dvae-eval feed the model."""
    x = to_unit_float(evaluation_view(image, size))
    if channels == 1 and x.shape[0] == 3:  # the weights sum to 1 only up to rounding: clamp
        x = (x * GREY[:, None, None]).sum(dim=0, keepdim=True).clamp_(0.0, 1.0)
    return x


def load_image(path: str | Path, size: int, channels: int = 3) -> Tensor:
    """An image file as dvae-encode sees it: float [channels, size, size] in [0, 1]."""
    return prepare_image(read_rgb(Path(path)), size, channels)


def to_uint8(images: Tensor) -> Tensor:
    """Images in [0, 1] -> uint8, round(255 x): the values the PNGs of dvae-decode hold."""
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def save_png(image: Tensor, path: Path) -> None:
    """uint8 or [0, 1] float [C, H, W] -> an 8-bit PNG, written atomically."""
    from PIL import Image

    if image.is_floating_point():
        image = to_uint8(image)
    array = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: picture.save(f, format="PNG", optimize=True))


class ImageFiles(Dataset[Tensor]):
    """Every image file under a folder, in sorted order, prepared by `load_image`."""

    def __init__(self, paths: list[Path], size: int, channels: int):
        self.paths, self.size, self.channels = paths, size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return load_image(self.paths[index], self.size, self.channels)


def _parse_options(options: list[str]) -> dict[str, Any]:
    import yaml

    parsed = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--data-option {option!r} is not KEY=VALUE; write e.g. --data-option root=/data/mnist.")
        parsed[key.strip().removeprefix("data.")] = yaml.safe_load(value)
    return parsed


def open_images(data: str, size: int, channels: int, split: str = "val",
                options: list[str] | dict[str, Any] = ()) -> tuple[Dataset, list[str], dict[str, Any]]:
    """(dataset of [C, size, size] images, one source name per image, a description for meta.json).

    `data` is an image folder, a data config name (photos, shapes, mnist, cifar10, folder) or a
    data config .yaml file; a config's `split` (val or train) is read through `build_datamodule`."""
    path = Path(data).expanduser()
    if path.is_dir():
        paths, seen = walk_images(path)
        if not paths:
            raise ConfigError(
                f"--data {data} contains no image files ({seen} files seen; accepted: "
                f"{', '.join(IMAGE_EXTENSIONS)}); pass a folder of images or a data config name."
            )
        sources = [p.relative_to(path).as_posix() for p in paths]
        return ImageFiles(paths, size, channels), sources, {"kind": "folder", "root": str(path.resolve())}
    if data == "folder":
        raise ConfigError("--data folder: pass the image directory itself, e.g. --data /data/images.")
    if data == "webdataset":
        raise ConfigError(SHARDS_REFUSED.format(data=data))
    if split not in ("val", "train"):
        raise ConfigError(f"--split {split} is not known; use val or train.")
    if path.suffix in (".yaml", ".yml") and path.is_file():
        config_file, name = path, path.stem
    elif data in DATA_CONFIGS:
        config_file, name = files("dvae.configs") / "data" / f"{data}.yaml", data
    else:
        raise ConfigError(
            f"--data {data} is neither a folder of images nor a data config; pass a directory or one of "
            f"{', '.join(DATA_CONFIGS)}."
        )
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from dvae.data.datamodule import build_datamodule

    try:  # read as Hydra reads the data configs (interpolations included), then as a plain dict
        loaded = OmegaConf.create(config_file.read_text())
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(f"--data {data} is not valid YAML ({str(error).splitlines()[0]}); pass a data config "
                          f"file like dvae/configs/data/folder.yaml.") from error
    try:
        cfg = OmegaConf.to_container(loaded, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"--data {data}: {str(error).splitlines()[0]}; a data config file for dvae-encode must "
                          f"stand alone (its ${{...}} may name only its own keys).") from error
    if not isinstance(cfg, dict):
        raise ConfigError(f"--data {data} does not hold a data config (a mapping of data.* keys); pass a file "
                          f"like dvae/configs/data/folder.yaml, or a folder of images.")
    opts = options if isinstance(options, dict) else _parse_options(list(options))
    cfg.update(opts)
    if cfg.get("root") == "???":
        raise ConfigError(f"--data {data} reads its images from a folder you name: pass --data-option root=DIR.")
    cfg["crop_size"] = size
    datamodule = build_datamodule(cfg, seed=int(cfg.get("seed") or 0))
    dataset = datamodule.val_set if split == "val" else datamodule.train_set
    if not hasattr(dataset, "__len__"):
        raise ConfigError(SHARDS_REFUSED.format(data=data))
    if datamodule.channels != channels:
        raise ConfigError(
            f"--data {data} has {datamodule.channels}-channel images but the model reads {channels}; "
            f"use a model trained on this kind of data."
        )
    label = cfg.get("name", name)
    sources = [f"{label}/{split}/{i:06d}" for i in range(len(dataset))]
    spec = {"kind": "config", "name": str(data if path.suffix in (".yaml", ".yml") else name),
            "split": split, "options": opts}
    return dataset, sources, spec
