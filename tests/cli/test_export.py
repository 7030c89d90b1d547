"""dvae-export refuses a user's mistake or a damaged file with one sentence (exit 2) naming the key or the file,
before the expensive work, and leaves every file the user had as it was."""

import json

import pytest
import torch

import dvae.pretrained as pretrained_module
from dvae.cli.export import main as export_main
from dvae.model import DVAE
from tests.cli.conftest import TINY, edit_json, read_only_write, snapshot
from tests.conftest import one_sentence_error


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
