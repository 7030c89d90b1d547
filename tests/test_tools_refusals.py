"""The tools at the edge refuse a user's mistake or a damaged file with one sentence (exit 2) that
names the key or the file, before the expensive work, and leave every file the user had as it was:
dvae-export --force, dvae-encode, dvae-decode, dvae-import-openai and dvae-report.

The models are untrained and tiny (nothing here trains): the refusals do not depend on the weights."""

import errno
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import dvae.data.images as images_module
import dvae.formats.devices as devices_module
import dvae.formats.encode as encode_module
import dvae.formats.pretrained as pretrained_module
from dvae.cli.decode import main as decode_main
from dvae.cli.encode import main as encode_main
from dvae.cli.export import main as export_main
from dvae.cli.import_openai import main as import_main
from dvae.cli.report import main as report_main
from dvae.formats.openai import to_official
from dvae.model import DVAE

from .conftest import one_sentence_error

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


# --------------------------------------------------------------------------------------------- dvae-export


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint as dvae-train writes it (state dict and hyper-parameters), without training."""
    from dvae.training.module import DVAELightning

    system = DVAELightning(**TINY)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams), "global_step": 0}, path)
    return path


@pytest.mark.parametrize("first, second, mine", [
    (None, "safetensors", ["model.npz", "model.pt", "codebook.pt"]),    # --force into a folder of the user's
    ("safetensors", "safetensors", ["model.npz", "model.pt", "codebook.npy"]),
    ("pt", "safetensors", ["model.npz", "codebook.npy"]),               # the earlier pt export is replaced
    ("npy", "pt", ["model.safetensors"]),
])
def test_force_removes_only_what_the_previous_export_wrote(first, second, mine, checkpoint, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    if first:
        assert export_main([str(checkpoint), "--out", str(out), "--format", first]) == 0
        wrote = set(json.loads((out / "dvae.json").read_text())["files"].values())
    for name in mine:
        (out / name).write_bytes(f"the user's own {name}".encode())
    (out / "notes.txt").write_text("my notes\n")
    users = {k: v for k, v in snapshot(out).items() if k in [*mine, "notes.txt"]}
    assert export_main([str(checkpoint), "--out", str(out), "--format", second, "--force"]) == 0
    now = json.loads((out / "dvae.json").read_text())["files"]
    after = snapshot(out)
    assert {k: after[k] for k in users} == users  # byte for byte
    stale = (wrote - set(now.values())) if first else set()
    assert sorted(after) == sorted({*users, "dvae.json", *now.values()}) and not stale & set(after)
    assert DVAE.from_pretrained(out).K == 32


def test_force_ignores_names_a_hand_edited_dvae_json_lists(checkpoint, tmp_path):
    out = tmp_path / "export"
    assert export_main([str(checkpoint), "--out", str(out), "--format", "pt"]) == 0
    (tmp_path / "outside.txt").write_text("not the export's\n")
    (out / "notes.txt").write_text("mine\n")
    edit_json(out / "dvae.json", files={"model": "notes.txt", "codebook": "../outside.txt"})
    assert export_main([str(checkpoint), "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine\n"
    assert (tmp_path / "outside.txt").read_text() == "not the export's\n"


def test_a_read_only_out_of_dvae_export_is_one_sentence(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pretrained_module, "_write_tensors", read_only_write)
    assert export_main([str(checkpoint), "--out", str(tmp_path / "export")]) == 2
    error = one_sentence_error(capsys, "dvae-export")
    assert f"{tmp_path / 'export'}: read-only file system" in error and "Errno" not in error


# --------------------------------------------------------------------------------------------- dvae-encode


def bad_dvae_json(model_dir, tmp_path, **changes):
    copy = shutil.copytree(model_dir, tmp_path / "model")
    edit_json(copy / "dvae.json", **changes)
    return copy


@pytest.mark.parametrize("case, args, message", [
    ("size_beyond_any_memory", ["--size", "400000"], "--size 400000 needs about"),
    ("size_beyond_this_memory", ["--size", "256"], "--size 256 needs about 12.2 MB of memory to encode one image "
                                                   "but this machine has 2.0 MB; use --size 100 or less."),
    ("batch_beyond_this_memory", ["--size", "256"], "--size 256 with --batch-size 5 needs about 60.9 MB of memory "
                                                    "but this machine has 40.0 MB; use --batch-size 3 or less."),
    ("image_size_in_dvae_json", [], "dvae.json has image_size=18, not a positive multiple of the model's "
                                    "downsampling factor 4; pass --size (e.g. --size 16)"),
    ("image_size_text_in_dvae_json", [], "dvae.json has image_size='big'"),
    ("downsampling_3_in_dvae_json", [], "dvae.json has downsampling=3, but it must be 4 for its 3 groups"),
    ("downsampling_8_in_dvae_json", [], "dvae.json has downsampling=8, but it must be 4 for its 3 groups"),
    ("read_only_out", [], "cannot be written"),
])
def test_dvae_encode_refuses_before_reading_weights(case, args, message, model_dir, image_dir, tmp_path, capsys,
                                                    no_weights_read, monkeypatch):
    model, out = model_dir, tmp_path / "tokens"
    if case == "size_beyond_this_memory":  # 12 MB per 256x256 image
        monkeypatch.setattr(devices_module, "device_memory", lambda device: 2_000_000)
    elif case == "batch_beyond_this_memory":
        monkeypatch.setattr(devices_module, "device_memory", lambda device: 40_000_000)
    elif case == "image_size_in_dvae_json":
        model = bad_dvae_json(model_dir, tmp_path, image_size=18)
    elif case == "image_size_text_in_dvae_json":
        model = bad_dvae_json(model_dir, tmp_path, image_size="big")
    elif case.startswith("downsampling"):
        model = bad_dvae_json(model_dir, tmp_path, downsampling=int(case.split("_")[1]))
    elif case == "read_only_out":  # tests run as root, to whom chmod'ed folders are writable: access() says no
        out.mkdir()
        monkeypatch.setattr(pretrained_module.os, "access", lambda path, mode: False)
    before = snapshot(tmp_path)
    assert encode(model, image_dir, out, *args) == 2
    error = one_sentence_error(capsys, "dvae-encode")
    assert message in error
    if "dvae_json" in case:
        assert str(model / "dvae.json") in error and "--size" not in error.split("dvae.json")[0]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("tool", ["dvae-encode", "dvae-decode"])
def test_a_read_only_out_found_late_is_one_sentence_naming_it(tool, model_dir, image_dir, encoded, tmp_path, capsys,
                                                              monkeypatch):
    out = tmp_path / "out"
    if tool == "dvae-encode":
        monkeypatch.setattr(encode_module, "write_json", read_only_write)
        assert encode(model_dir, image_dir, out) == 2
    else:
        monkeypatch.setattr(images_module, "atomic_write", read_only_write)  # the first PNG
        assert decode(model_dir, encoded, out) == 2
    error = one_sentence_error(capsys, tool)
    assert error.startswith(f"{tool}: error: {out}: read-only file system; fix that") and "Errno" not in error


# --------------------------------------------------------------------------------------------- dvae-decode


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


# --------------------------------------------------------------------------------------------- dvae-import-openai


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """encoder.pkl and decoder.pkl with the official key names (4 groups, as dall_e has)."""
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    encoder, decoder = to_official(DVAE(**{**TINY, "groups": 4}))
    torch.save(encoder, root / "encoder.pkl")
    torch.save(decoder, root / "decoder.pkl")
    (root / "README.txt").write_text("the official weights\n")
    return root


@pytest.mark.parametrize("case, message", [
    ("encoder_is_a_directory", "is a directory; pass the file encoder.pkl itself"),
    ("encoder_is_a_text_file", "README.txt is not a pickle or PyTorch file"),
    ("swapped", "look swapped; pass them the other way round"),
    ("two_decoders", "both look like decoders"),
    ("read_only_out", "cannot be written"),
    ("read_only_out_found_late", "export: read-only file system"),
])
def test_dvae_import_openai_refuses_with_one_sentence(case, message, official, tmp_path, capsys, monkeypatch):
    encoder, decoder, out = official / "encoder.pkl", official / "decoder.pkl", tmp_path / "export"
    if case == "encoder_is_a_directory":
        encoder = official
    elif case == "encoder_is_a_text_file":
        encoder = official / "README.txt"
    elif case == "swapped":
        encoder, decoder = decoder, encoder
    elif case == "two_decoders":
        encoder = decoder
    elif case == "read_only_out":
        out.mkdir()
        monkeypatch.setattr(pretrained_module.os, "access", lambda path, mode: False)
    else:
        monkeypatch.setattr(pretrained_module, "_write_tensors", read_only_write)
    before = snapshot(official)
    assert import_main(["--encoder", str(encoder), "--decoder", str(decoder), "--out", str(out)]) == 2
    error = one_sentence_error(capsys, "dvae-import-openai")
    assert message in error and "Errno" not in error
    assert str(official if case == "encoder_is_a_directory" else out if "out" in case else encoder) in error
    if case == "encoder_is_a_directory":
        assert f"({official / 'encoder.pkl'} is there)" in error
    assert snapshot(official) == before
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------------------------- dvae-report


def test_dvae_report_names_a_damaged_metrics_json(tmp_path, capsys):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- data=shapes\n")
    (run / "metrics.json").write_text('{"psnr": 21.5, "bits_per')
    report_main([str(run), "--no-plot"])
    out = capsys.readouterr().out
    assert "1 job(s): 0 finished, 0 failed, 0 unfinished, 1 damaged." in out
    assert f"{run / 'metrics.json'} is damaged (not a JSON object)" in out
    assert (run / "metrics.json").read_text() == '{"psnr": 21.5, "bits_per'
