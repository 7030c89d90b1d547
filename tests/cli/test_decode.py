"""dvae-decode refuses a user's mistake or a damaged file with one sentence (exit 2) naming the key or the file,
before the expensive work, and leaves every file the user had as it was."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import dvae.formats.devices as devices_module
from tests.cli.conftest import decode, edit_json, encode, snapshot
from tests.conftest import one_sentence_error


def damage_index(tokens, line, text):
    lines = (tokens / "index.jsonl").read_text().splitlines()
    lines[line] = text
    (tokens / "index.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def shapes_encoded(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "t"
    assert encode(model_dir, "shapes", out, "--data-option", "val_samples=6") == 0
    return out


@pytest.mark.parametrize("case, names, message", [
    ("row_minus_one", "index", "index.jsonl line 1 is damaged (row=-1, not an integer of at least 0)"),
    ("row_beyond_its_shard", "index", "index.jsonl is damaged: the line of b.png points at row 2 of shard_00000.npy, "
                                      "which holds 2 grids"),
    ("shard_is_text", "index", "index.jsonl line 3 is damaged (shard='x', not an integer of at least 0)"),
    ("source_missing", "index", "index.jsonl line 2 is damaged (source=None, not a file name)"),
    ("line_not_json", "index", "index.jsonl line 2 is damaged (not JSON)"),
    ("index_not_text", "index", "index.jsonl is not text"),
    ("grid_beyond_memory", "tokens", "holds 4x4 token grids (16x16-pixel images): decoding one needs about 47.6 kB "
                                     "of memory but this machine has 20.0 kB"),
    ("batch_beyond_memory", "tokens", "decoding 5 at a time needs about 238.1 kB of memory but this machine has "
                                      "200.0 kB; use --batch-size 4 or less."),
    ("sheet_beyond_memory", "tokens", "a contact sheet of 5 of them needs about 7.7 kB of memory"),
    ("source_renamed", "images/b.png", "b.png, an image the tokens were made from, is no longer there"),
    ("source_deleted", "images/e.png", "e.png, an image the tokens were made from, is no longer there"),
    ("source_folder_gone", "images", "the image folder"),
    ("data_config_changed", "meta", "--originals: --data shapes no longer gives the images"),
    ("meta_without_data", "meta", "does not say which images the tokens were made from"),
])
def test_dvae_decode_refuses_before_reading_weights(case, names, message, model_dir, image_dir, encoded,
                                                    shapes_encoded, tmp_path, capsys, no_weights_read, monkeypatch):
    tokens = shutil.copytree(shapes_encoded if case == "data_config_changed" else encoded, tmp_path / "tokens")
    images = shutil.copytree(image_dir, tmp_path / "images")
    if case != "data_config_changed":
        edit_json(tokens / "meta.json", data={"kind": "folder", "root": str(images)})
    args = []
    if case == "row_minus_one":
        damage_index(tokens, 0, '{"i": 0, "shard": 0, "row": -1, "source": "a.png"}')
    elif case == "row_beyond_its_shard":
        damage_index(tokens, 1, '{"i": 1, "shard": 0, "row": 2, "source": "b.png"}')
    elif case == "shard_is_text":
        damage_index(tokens, 2, '{"i": 2, "shard": "x", "row": 0, "source": "c.png"}')
    elif case == "source_missing":
        damage_index(tokens, 1, '{"i": 1, "shard": 0, "row": 1}')
    elif case == "line_not_json":
        damage_index(tokens, 1, "garbage")
    elif case == "index_not_text":
        (tokens / "index.jsonl").write_bytes(b"\xff\xfe" * 20)
    elif case == "grid_beyond_memory":  # 16x16-pixel images need about 0.05 MB each
        monkeypatch.setattr(devices_module, "device_memory", lambda device: 20_000)
    elif case == "batch_beyond_memory":
        monkeypatch.setattr(devices_module, "device_memory", lambda device: 200_000)
    elif case == "sheet_beyond_memory":
        monkeypatch.setattr(devices_module, "device_memory", lambda device: 10_000)
        args = ["--grid"]
    elif case == "source_renamed":
        (images / "b.png").rename(images / "z.png")
    elif case == "source_deleted":
        (images / "e.png").unlink()
    elif case == "source_folder_gone":
        shutil.rmtree(images)
    elif case == "data_config_changed":  # tokens of 6 shapes; the same config gives 5 now
        meta = json.loads((tokens / "meta.json").read_text())
        edit_json(tokens / "meta.json", data={**meta["data"], "options": {"val_samples": 5}})
    elif case == "meta_without_data":
        edit_json(tokens / "meta.json", data=None)
    if case.startswith(("source", "data", "meta")):
        args = ["--grid", "--originals"]
    before = snapshot(tmp_path)
    assert decode(model_dir, tokens, tmp_path / "decoded", *args) == 2
    error = one_sentence_error(capsys, "dvae-decode")
    assert message in error
    named = {"index": tokens / "index.jsonl", "tokens": f"--tokens {tokens}", "meta": tokens / "meta.json",
             "images": images}.get(names, tmp_path / names)
    assert str(named) in error
    assert snapshot(tmp_path) == before and not (tmp_path / "decoded").exists()


def test_originals_pair_each_decoding_with_its_own_source_by_name(model_dir, image_dir, encoded, tmp_path):
    """A new image that sorts first shifts every position; the pairs still go by the recorded names."""
    images = shutil.copytree(image_dir, tmp_path / "images")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "0_new.png")
    tokens = shutil.copytree(encoded, tmp_path / "tokens")
    edit_json(tokens / "meta.json", data={"kind": "folder", "root": str(images)})
    assert decode(model_dir, tokens, tmp_path / "sheet.png", "--grid", "--originals", "--nrow", "5") == 0
    sheet = np.array(Image.open(tmp_path / "sheet.png"))
    for k, name in enumerate(["a.png", "b.png", "c.png", "d.png", "e.png"]):
        tile = sheet[2:18, 2 + 18 * k:18 + 18 * k]
        assert np.array_equal(tile, np.array(Image.open(images / name))), name


def test_a_torn_last_index_line_is_still_an_interrupted_run_not_damage(model_dir, encoded, tmp_path):
    tokens = shutil.copytree(encoded, tmp_path / "tokens")
    with open(tokens / "index.jsonl", "a") as index:
        index.write('{"i": 5, "sha')
    assert decode(model_dir, tokens, tmp_path / "decoded") == 0
    assert len(list((tmp_path / "decoded").glob("*.png"))) == 5
