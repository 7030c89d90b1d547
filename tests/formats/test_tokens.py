"""dvae-encode / dvae-decode: token shards, the index, resuming, and agreement with the Python API."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dvae.formats.encode as encode_module
from dvae.cli.decode import main as decode_main
from dvae.cli.encode import main as encode_main
from dvae.data.images import load_image, to_uint8
from dvae.errors import ConfigError
from dvae.formats.checkpoint import export
from dvae.formats.tokens import load_tokens
from dvae.model import DVAE
from dvae.training.run import train
from tests.conftest import FAST, compose_config, one_sentence_error


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model trained for a few steps on 16-pixel crops, exported once for the module."""
    run = tmp_path_factory.mktemp("run")
    train(compose_config([*FAST, "data=shapes", "data.crop_size=16"]), run_dir=run)
    return export(run, run / "export")


@pytest.fixture(scope="module")
def model(model_dir):
    return DVAE.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Five images of assorted sizes and modes (one in a sub-folder), and a file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(root / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / "c_grey.png")
    Image.fromarray(rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)).save(root / "sub" / "d_rgba.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "sub" / "e.png")
    (root / "README.txt").write_text("not an image")
    return root


SOURCES = ["a.png", "b.jpg", "c_grey.png", "sub/d_rgba.png", "sub/e.png"]


def encode(model_dir, data, out, *extra):
    return encode_main(["--model", str(model_dir), "--data", str(data), "--out", str(out), "--no-progress", *extra])


def decode(model_dir, tokens, out, *extra):
    return decode_main(["--model", str(model_dir), "--tokens", str(tokens), "--out", str(out), "--no-progress",
                        *extra])


@pytest.fixture(scope="module")
def encoded(model_dir, image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    assert encode(model_dir, image_dir, out, "--shard-size", "2", "--batch-size", "3") == 0
    return out


def test_cli_round_trip_equals_the_python_api(model_dir, model, image_dir, encoded, tmp_path):
    grids, sources = load_tokens(encoded)
    assert sources == SOURCES
    assert grids.dtype == np.uint16 and grids.shape == (5, 4, 4)
    images = torch.stack([load_image(image_dir / s, 16) for s in SOURCES])
    with torch.no_grad():
        api_tokens = model.encode(images)
        api_images = to_uint8(model.decode(api_tokens))
    assert torch.equal(torch.from_numpy(grids.astype(np.int64)), api_tokens)
    assert decode(model_dir, encoded, tmp_path / "decoded") == 0
    for source, expected in zip(SOURCES, api_images):
        path = (tmp_path / "decoded" / source).with_suffix(".png")
        png = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)
        assert torch.equal(png, expected), source


def test_an_exactly_sized_image_is_fed_unchanged(image_dir):
    original = torch.from_numpy(np.array(Image.open(image_dir / "a.png"))).permute(2, 0, 1)
    assert torch.equal(to_uint8(load_image(image_dir / "a.png", 16)), original)
    assert load_image(image_dir / "b.jpg", 16).shape == (3, 16, 16)  # shorter side resized, centre cut
    assert load_image(image_dir / "sub" / "d_rgba.png", 16).shape == (3, 16, 16)  # small images grow


def test_shards_index_and_meta(encoded, model_dir):
    assert sorted(p.name for p in encoded.iterdir()) == ["index.jsonl", "meta.json", "shard_00000.npy",
                                                         "shard_00001.npy", "shard_00002.npy"]
    index = [json.loads(line) for line in (encoded / "index.jsonl").read_text().splitlines()]
    assert [(r["i"], r["shard"], r["row"]) for r in index] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1), (4, 2, 0)]
    meta = json.loads((encoded / "meta.json").read_text())
    config = json.loads((model_dir / "dvae.json").read_text())
    assert meta["complete"] and meta["num_images"] == 5 and meta["grid"] == [4, 4] and meta["image_size"] == 16
    assert meta["model"]["K"] == 32 and meta["dtype"] == "uint16"
    assert meta["model"]["checkpoint_sha256"] == config["source"]["sha256"]
    assert np.load(encoded / "shard_00002.npy").shape == (1, 4, 4)


def test_an_interrupted_run_continues_where_it_stopped(model_dir, image_dir, encoded, tmp_path, monkeypatch):
    out = tmp_path / "tokens"
    real_write, calls = encode_module.write_shard, []

    def write_then_stop(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[1])
        real_write(*args)

    monkeypatch.setattr(encode_module, "write_shard", write_then_stop)
    assert encode(model_dir, image_dir, out, "--shard-size", "2") == 130
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000.npy", "shard_00001.npy"]
    first = (out / "shard_00000.npy").stat().st_mtime_ns
    # Leftovers of a harder stop: a torn index line and a shard file without its index lines.
    with open(out / "index.jsonl", "a") as index:
        index.write('{"i": 4, "sha')
    np.save(out / "shard_00002.npy", np.zeros((2, 4, 4), np.uint16))
    (out / ".shard_00002.npy.123.abcd.tmp").write_bytes(b"half a shard")
    monkeypatch.setattr(encode_module, "write_shard", lambda *args: (calls.append(args[1]), real_write(*args)))
    assert encode(model_dir, image_dir, out, "--shard-size", "2") == 0
    assert calls == [0, 1, 2]  # only the missing shard was encoded again
    assert not list(out.glob(".*.tmp"))
    assert (out / "shard_00000.npy").stat().st_mtime_ns == first
    grids, sources = load_tokens(out)
    expected, _ = load_tokens(encoded)
    assert sources == SOURCES and np.array_equal(grids, expected)
    assert (out / "index.jsonl").read_text() == (encoded / "index.jsonl").read_text()
    # A finished run has nothing left to do.
    assert encode(model_dir, image_dir, out, "--shard-size", "2") == 0
    assert calls == [0, 1, 2]


def test_other_settings_in_the_same_out_are_refused_unless_forced(model_dir, image_dir, encoded, tmp_path, capsys):
    import shutil

    out = shutil.copytree(encoded, tmp_path / "tokens")
    assert encode(model_dir, image_dir, out, "--shard-size", "2", "--size", "32") == 2
    assert "image_size" in capsys.readouterr().err
    assert encode(model_dir, image_dir, out, "--shard-size", "2", "--size", "32", "--force") == 0
    assert load_tokens(out)[0].shape == (5, 8, 8)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("x")
    assert encode(model_dir, image_dir, busy) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in busy.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize("args, message", [
    (["--size", "18"], "--size 18 is not a positive multiple of the model's downsampling factor 4"),
    (["--data-option", "oops"], "is not KEY=VALUE"),
])
def test_bad_encode_arguments_say_what_to_do(args, message, model_dir, tmp_path, capsys):
    assert encode(model_dir, "shapes", tmp_path / "t", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_a_data_config_is_encoded_by_name(model_dir, tmp_path):
    out = tmp_path / "t"
    assert encode(model_dir, "shapes", out, "--data-option", "val_samples=6", "--size", "32") == 0
    grids, sources = load_tokens(out)
    assert grids.shape == (6, 8, 8) and sources[0] == "shapes/val/000000"
    assert json.loads((out / "meta.json").read_text())["data"] == {
        "kind": "config", "name": "shapes", "split": "val", "options": {"val_samples": 6}}


def test_the_contact_sheet_and_originals(model_dir, encoded, tmp_path):
    assert decode(model_dir, encoded, tmp_path / "g", "--grid") == 0
    with Image.open(tmp_path / "g" / "contact_sheet.png") as sheet:
        assert sheet.size == (5 * 18 + 2, 18 + 2)
    assert decode(model_dir, encoded, tmp_path / "sheet.png", "--grid", "--originals", "--nrow", "3") == 0
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size == (3 * 18 + 2, 4 * 18 + 2)  # two rows of originals above two of decodings


def test_decode_refuses_tokens_outside_the_codebook_and_a_busy_out(model_dir, encoded, tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.full((2, 4, 4), 32, np.int64))
    assert decode(model_dir, tmp_path / "bad.npy", tmp_path / "d") == 2
    assert "K=32" in capsys.readouterr().err
    np.save(tmp_path / "float.npy", np.zeros((2, 4, 4), np.float32))
    assert decode(model_dir, tmp_path / "float.npy", tmp_path / "d") == 2
    assert "integer token grids" in capsys.readouterr().err
    assert decode(model_dir, encoded, tmp_path / "bad.npy", "--grid") == 2  # not a directory
    assert decode(model_dir, encoded, tmp_path) == 2
    assert "--force" in capsys.readouterr().err


def test_a_single_grid_npy_decodes(model_dir, model, tmp_path):
    grid = np.arange(16, dtype=np.uint16).reshape(4, 4)
    np.save(tmp_path / "one.npy", grid)
    assert decode(model_dir, tmp_path / "one.npy", tmp_path / "out") == 0
    with torch.no_grad():
        expected = to_uint8(model.decode(torch.from_numpy(grid.astype(np.int64))[None]))[0]
    png = torch.from_numpy(np.array(Image.open(tmp_path / "out" / "000000.png"))).permute(2, 0, 1)
    assert torch.equal(png, expected)


def test_the_command_reports_a_bad_folder_without_a_traceback(model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "dvae.cli.encode", "--model", str(model_dir), "--data",
                             str(tmp_path / "empty"), "--out", str(tmp_path / "t")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "contains no image files" in result.stderr and "Traceback" not in result.stderr


def test_a_model_directory_that_is_not_an_export_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no dvae.json"):
        DVAE.from_pretrained(tmp_path)


def test_an_unreadable_image_stops_the_run_and_the_fixed_folder_continues(model_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(folder / name)
    (folder / "d.png").write_bytes(b"not a png")
    out = tmp_path / "tokens"
    assert encode(model_dir, folder, out, "--shard-size", "1", "--batch-size", "1") == 2
    error = capsys.readouterr().err
    assert "d.png" in error and "run the same command to continue" in error
    assert len(list(out.glob("shard_*.npy"))) == 3
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(folder / "d.png")
    assert encode(model_dir, folder, out, "--shard-size", "1", "--batch-size", "1") == 0
    assert "continuing after 3 of 4" in capsys.readouterr().err
    assert load_tokens(out)[1] == ["a.png", "b.png", "c.png", "d.png"]


# --------------------------------------------------------------------------- wrong input to the commands


def untrained_export(path, K):
    """An export of a model like the trained one (4x4 pixels per token) but with K codes."""
    DVAE(n_hid=8, blocks_per_group=1, groups=3, K=K, n_init=8).save_pretrained(path, metadata={"image_size": 16})
    return path


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_weights_read(monkeypatch):
    """Loading the model's weights fails the test: the refusals come before that work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were read before the input was checked")

    monkeypatch.setattr(encode_module.DVAE, "from_pretrained", refuse)


@pytest.mark.parametrize("case, message", [
    ("model_missing", "does not exist"),
    ("model_is_a_txt_file", "is a file, not a directory"),
    ("data_is_a_txt_file", "is neither a folder of images nor a data config"),
    ("data_yaml_is_not_a_mapping", "does not hold a data config"),
    ("data_yaml_is_not_yaml", "is not valid YAML"),
    ("data_yaml_names_a_key_it_lacks", "a data config file for dvae-encode must stand alone"),
    ("out_is_a_file", "is a file, not a directory"),
    ("out_holds_tokens_of_another_K", "made with a different model"),
])
def test_dvae_encode_refuses_wrong_inputs_before_reading_weights(case, message, model_dir, image_dir, encoded,
                                                                 tmp_path, capsys, no_weights_read):
    import shutil

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    model, data, out = model_dir, image_dir, tmp_path / "tokens"
    if case == "model_missing":
        model = tmp_path / "no_such_export"
    elif case == "model_is_a_txt_file":
        model = notes
    elif case == "data_is_a_txt_file":
        data = notes
    elif case == "data_yaml_is_not_a_mapping":
        data = tmp_path / "data.yaml"
        data.write_text("- just\n- a list\n")
    elif case == "data_yaml_is_not_yaml":
        data = tmp_path / "data.yaml"
        data.write_text("name: [unclosed\n")
    elif case == "data_yaml_names_a_key_it_lacks":
        data = tmp_path / "data.yaml"
        data.write_text("name: shapes\nval_samples: ${trainer.max_steps}\n")
    elif case == "out_is_a_file":
        out = notes
    else:
        out = shutil.copytree(encoded, tmp_path / "tokens")
        model = untrained_export(tmp_path / "k16", K=16)
    before = snapshot(tmp_path)
    assert encode(model, data, out) == 2
    assert message in one_sentence_error(capsys, "dvae-encode")
    assert snapshot(tmp_path) == before  # nothing the user had was changed, nothing was added


@pytest.mark.parametrize("case, message", [
    ("tokens_missing", "does not exist"),
    ("tokens_are_a_txt_file", "could not be read as a .npy file"),
    ("tokens_are_an_npz_archive", "is a .npz archive"),
    ("tokens_are_an_image_folder", "has no index.jsonl"),
    ("negative_tokens", "token values in [-1, 31]"),
    ("tokens_at_K", "32] but the model has K=32"),
    ("empty_grids", "empty token grids"),
    ("grid_unlike_meta", "holds 2x2 token grids but its meta.json says 4x4"),
    ("model_with_fewer_codes", "made by a model with K=32 codes"),
    ("model_with_more_codes", "made by a model with K=32 codes"),
])
def test_dvae_decode_refuses_wrong_inputs_before_reading_weights(case, message, model_dir, image_dir, encoded,
                                                                 tmp_path, capsys, no_weights_read):
    import shutil

    model, tokens = model_dir, tmp_path / "tokens.npy"
    grids = np.arange(2 * 4 * 4).reshape(2, 4, 4) % 32
    if case == "tokens_missing":
        tokens = tmp_path / "no_such_tokens"
    elif case == "tokens_are_a_txt_file":
        tokens = tmp_path / "tokens.txt"
        tokens.write_text("1 2 3\n")
    elif case == "tokens_are_an_npz_archive":
        tokens = tmp_path / "tokens.npz"
        np.savez(tokens, grids=grids)
    elif case == "tokens_are_an_image_folder":
        tokens = image_dir
    elif case in ("negative_tokens", "tokens_at_K"):
        grids[0, 0, 0] = -1 if case == "negative_tokens" else 32
        np.save(tokens, grids)
    elif case == "empty_grids":
        np.save(tokens, np.zeros((2, 0, 4), np.int64))
    elif case == "grid_unlike_meta":
        tokens = shutil.copytree(encoded, tmp_path / "tokens")
        np.save(tokens / "shard_00000.npy", np.zeros((2, 2, 2), np.uint16))
    else:  # a TOKENS directory of the K=32 model decoded by a model with 16 or 64 codes
        tokens = encoded
        model = untrained_export(tmp_path / "other", K=16 if case == "model_with_fewer_codes" else 64)
    before = snapshot(tmp_path)
    assert decode(model, tokens, tmp_path / "decoded") == 2
    assert message in one_sentence_error(capsys, "dvae-decode")
    assert snapshot(tmp_path) == before and not (tmp_path / "decoded").exists()
