"""dvae-import-openai refuses a user's mistake or a damaged file with one sentence (exit 2) naming the key or the file,
before the expensive work, and leaves every file the user had as it was."""


import pytest
import torch

import dvae.pretrained as pretrained_module
from dvae.cli.import_openai import main as import_main
from dvae.formats.openai import to_official
from dvae.model import DVAE
from tests.cli.conftest import TINY, read_only_write, snapshot
from tests.conftest import one_sentence_error


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
