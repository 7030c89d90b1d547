"""What the tests of the file tools share: a tiny untrained export, a folder of images, its tokens, and
helpers that call each command in-process. The models are untrained and tiny (nothing here trains): the
refusals do not depend on the weights."""

import errno
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import dvae.formats.encode as encode_module
from dvae.cli.decode import main as decode_main
from dvae.cli.encode import main as encode_main
from dvae.model import DVAE

TINY = dict(n_hid=8, blocks_per_group=1, groups=3, K=32, n_init=8)  # 4x4 pixels per token


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def encode(model, data, out, *extra):
    return encode_main(["--model", str(model), "--data", str(data), "--out", str(out), "--no-progress", *extra])


def decode(model, tokens, out, *extra):
    return decode_main(["--model", str(model), "--tokens", str(tokens), "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "tiny"
    torch.manual_seed(0)
    DVAE(**TINY).save_pretrained(path, metadata={"image_size": 16})
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name)
    return root


@pytest.fixture(scope="module")
def encoded(model_dir, image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens") / "t"
    assert encode(model_dir, image_dir, out, "--shard-size", "2") == 0
    return out


@pytest.fixture
def no_weights_read(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were read before the input was checked")

    monkeypatch.setattr(encode_module.DVAE, "from_pretrained", refuse)


def read_only_write(path, *args):
    """Stands for an atomic write into a read-only --out (tests run as root, to whom chmod'ed folders are
    writable): the error names the temporary file, as the real one does."""
    raise OSError(errno.EROFS, "Read-only file system", str(path.parent / f".{path.name}.1.abcd.tmp"))


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def bad_dvae_json(model_dir, tmp_path, **changes):
    copy = shutil.copytree(model_dir, tmp_path / "model")
    edit_json(copy / "dvae.json", **changes)
    return copy
