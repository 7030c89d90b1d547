"""dvae-encode refuses a user's mistake or a damaged file with one sentence (exit 2) naming the key or the file,
before the expensive work, and leaves every file the user had as it was."""


import pytest

import dvae.data.images as images_module
import dvae.formats.devices as devices_module
import dvae.formats.encode as encode_module
import dvae.pretrained as pretrained_module
from tests.cli.conftest import bad_dvae_json, decode, encode, read_only_write, snapshot
from tests.conftest import one_sentence_error


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
