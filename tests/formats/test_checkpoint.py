"""dvae-export and DVAE.from_pretrained / save_pretrained: the export is the checkpoint's model, exactly."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import dvae
from dvae.cli.export import main
from dvae.errors import ConfigError
from dvae.formats.checkpoint import export
from dvae.model import DEFAULT_LOG_SCALE_FLOOR, DVAE
from dvae.training.module import DVAELightning
from dvae.training.run import train
from tests.conftest import FAST, FIXTURES, ROOT, compose_config, one_sentence_error


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny training run for the whole module (a few seconds)."""
    path = tmp_path_factory.mktemp("run")
    train(compose_config([*FAST, "data=shapes", "data.crop_size=16", "ema.decay=0.5"]), run_dir=path)
    return path


@pytest.fixture(scope="module")
def system(run_dir):
    return DVAELightning.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt", map_location="cpu")


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", ["safetensors", "npy", "pt"])
def test_export_gives_the_checkpoints_ema_model_exactly(fmt, run_dir, system, images, tmp_path):
    export(run_dir, tmp_path / "export", format=fmt)
    model = DVAE.from_pretrained(tmp_path / "export")
    reference = system.ema_model.eval()
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model.logits(images), reference.logits(images))
        tokens = model.encode(images)
        assert torch.equal(tokens, reference.encode(images))
        assert torch.equal(model.decode(tokens), reference.decode(tokens))
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_raw_weights_are_the_trained_not_the_averaged_ones(run_dir, system, tmp_path):
    export(run_dir, tmp_path / "raw", weights="raw")
    model = DVAE.from_pretrained(tmp_path / "raw")
    key = "encoder.blocks.input.weight"
    assert torch.equal(model.state_dict()[key], system.model.state_dict()[key])
    assert not torch.equal(model.state_dict()[key], system.ema_model.state_dict()[key])


def test_dvae_json_says_how_to_rebuild_and_where_it_came_from(run_dir, tmp_path):
    export(run_dir, tmp_path / "e", checkpoint="last")
    config = json.loads((tmp_path / "e" / "dvae.json").read_text())
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert config["model"] == {"channels": 3, "n_hid": 8, "blocks_per_group": 1, "groups": 3, "K": 32,
                               "n_init": 8, "learned_scale": False, "log_scale_floor": DEFAULT_LOG_SCALE_FLOOR,
                               "eps": 0.1, "hard": False}
    assert (config["K"], config["D"], config["channels"], config["downsampling"]) == (32, 8, 3, 4)
    assert config["pixel_eps"] == 0.1 and config["image_size"] == 16
    assert config["scale_mode"] == "constant" and config["scale"] == 0.1  # the default's fixed b, for dvae-eval
    assert config["training"]["step"] == 4 and config["training"]["weights"] == "ema"
    assert config["source"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert config["dvae_version"] == dvae.__version__
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["codebook.safetensors", "dvae.json",
                                                                  "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "e" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not private
    # The decoder's input projection is stored once: as the codebook.
    stored = load_file(tmp_path / "e" / "model.safetensors")
    assert "decoder.blocks.input.weight" not in stored
    assert {k.split(".")[0] for k in stored} == {"encoder", "decoder"}


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_the_exported_codebook_is_what_the_decoder_uses(fmt, run_dir, system, images, tmp_path):
    out = tmp_path / "e"
    export(run_dir, out, format=fmt)
    path = out / ("codebook.safetensors" if fmt == "safetensors" else "codebook.npy")
    codebook = load_file(path)["codebook"] if fmt == "safetensors" else torch.from_numpy(np.load(path))
    reference = system.ema_model
    assert codebook.shape == (32, 8)
    assert torch.equal(codebook, reference.codebook)
    assert torch.equal(codebook, reference.decoder.blocks.input.weight[:, :, 0, 0].t())
    with torch.no_grad():
        tokens = reference.encode(images)
        before = DVAE.from_pretrained(out).decode(tokens)
        perturbed = codebook + 0.5 * torch.randn(codebook.shape, generator=torch.Generator().manual_seed(1))
        if fmt == "safetensors":
            save_file({"codebook": perturbed.contiguous()}, path)
        else:
            np.save(path, perturbed.numpy())
        model = DVAE.from_pretrained(out)
        assert torch.equal(model.codebook, perturbed)
        assert (model.decode(tokens) - before).abs().max() > 1e-3


@pytest.mark.parametrize("fmt", ["safetensors", "npy", "pt"])
def test_save_pretrained_round_trips_every_format(fmt, tmp_path):
    torch.manual_seed(0)
    model = DVAE(n_hid=8, blocks_per_group=2, groups=2, K=40, n_init=12, learned_scale=False, eps=0.05,
                 hard=True).eval()
    model.save_pretrained(tmp_path / "m", format=fmt)
    loaded = DVAE.from_pretrained(tmp_path / "m")
    assert (loaded.K, loaded.downsampling, loaded.eps, loaded.learned_scale, loaded.quantizer.hard) == \
        (40, 2, 0.05, False, True)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x)), model.decode(model.encode(x)))


def test_force_is_needed_to_replace_an_export_and_replaces_only_export_files(run_dir, tmp_path, capsys):
    out = tmp_path / "e"
    assert main([str(run_dir), "--out", str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()
    assert main([str(run_dir), "--out", str(out), "--format", "pt"]) == 2
    error = capsys.readouterr().err
    assert "--force" in error and str(out) in error and "Traceback" not in error
    assert (out / "model.safetensors").read_bytes() == before  # nothing was touched
    (out / "NOTES.md").write_text("mine")
    assert main([str(run_dir), "--out", str(out), "--format", "pt", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md", "codebook.pt", "dvae.json", "model.pt"]
    assert DVAE.from_pretrained(out).K == 32


def test_a_non_empty_directory_is_refused_before_the_checkpoint_is_read(run_dir, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        export(run_dir, tmp_path / "busy")
    with pytest.raises(ConfigError, match="no checkpoints/best.ckpt or last.ckpt"):
        export(tmp_path / "busy", tmp_path / "new")
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    """One pristine export per format; tests damage copies of them."""
    root = tmp_path_factory.mktemp("exports")
    for fmt in ("safetensors", "npy", "pt"):
        export(run_dir, root / fmt, format=fmt)
    return root


def damaged_copy(exports, fmt, tmp_path):
    import shutil

    return Path(shutil.copytree(exports / fmt, tmp_path / fmt))


@pytest.mark.parametrize("fmt, name", [("safetensors", "model.safetensors"), ("safetensors", "codebook.safetensors"),
                                       ("npy", "model.npz"), ("npy", "codebook.npy"), ("pt", "model.pt")])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_file_gives_one_sentence_naming_it(fmt, name, damage, exports, tmp_path):
    out = damaged_copy(exports, fmt, tmp_path)
    data = (out / name).read_bytes()
    (out / name).write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * len(data))
    with pytest.raises(ConfigError) as error:
        DVAE.from_pretrained(out)
    message = str(error.value)
    assert name in message and "export the model again" in message
    assert "\n" not in message


def test_missing_unexpected_and_misshapen_tensors_are_named(exports, tmp_path):
    out = damaged_copy(exports, "safetensors", tmp_path)
    state = load_file(out / "model.safetensors")
    state.pop("encoder.blocks.group_2.block_1.res_path.conv_1.bias")
    state["decoder.extra.weight"] = torch.zeros(2)
    state["encoder.blocks.input.weight"] = torch.zeros(8, 3, 5, 5)
    save_file(state, out / "model.safetensors")
    with pytest.raises(ConfigError) as error:
        DVAE.from_pretrained(out)
    message = str(error.value)
    for name in ("encoder.blocks.group_2.block_1.res_path.conv_1.bias", "decoder.extra.weight",
                 "encoder.blocks.input.weight [8, 3, 5, 5] (expected [8, 3, 7, 7])"):
        assert name in message


def test_a_codebook_of_the_wrong_size_and_a_missing_file_are_named(exports, tmp_path):
    out = damaged_copy(exports, "safetensors", tmp_path)
    save_file({"codebook": torch.zeros(16, 8)}, out / "codebook.safetensors")
    with pytest.raises(ConfigError, match=r"\[16, 8\].*\[K, D\] = \[32, 8\]"):
        DVAE.from_pretrained(out)
    (out / "codebook.safetensors").unlink()
    with pytest.raises(ConfigError, match="codebook.safetensors is missing"):
        DVAE.from_pretrained(out)
    (out / "dvae.json").unlink()
    with pytest.raises(ConfigError, match="no dvae.json"):
        DVAE.from_pretrained(out)


def test_non_finite_weights_are_refused(exports, tmp_path):
    out = damaged_copy(exports, "safetensors", tmp_path)
    state = load_file(out / "model.safetensors")
    state["decoder.blocks.output.conv.bias"][0] = float("nan")
    save_file(state, out / "model.safetensors")
    with pytest.raises(ConfigError, match="decoder.blocks.output.conv.bias"):
        DVAE.from_pretrained(out)


def test_loading_an_export_needs_neither_lightning_nor_hydra(exports):
    script = ("import sys; from dvae.model import DVAE; "
              f"m = DVAE.from_pretrained({str(exports / 'safetensors')!r}); "
              "print(m.K, sorted(n for n in ('lightning', 'hydra', 'omegaconf') if n in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["32", "[]"]


def test_the_command_exits_with_a_sentence_and_the_scripts_are_declared(tmp_path):
    command = [sys.executable, "-m", "dvae.cli.export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    pyproject = (ROOT / "pyproject.toml").read_text()  # no tomllib: Python 3.10 is supported
    for line in ('dvae-export = "dvae.cli.export:cli"', 'dvae-encode = "dvae.cli.encode:cli"',
                 'dvae-decode = "dvae.cli.decode:cli"', '"safetensors'):
        assert line in pyproject


def write_notes(path):
    path.write_text("my notes, not a checkpoint\n")
    return path


@pytest.mark.parametrize("case, message", [
    ("txt_as_checkpoint", "could not be read as a training checkpoint"),
    ("torch_file_not_a_checkpoint", "is not a dvae-train checkpoint"),
    ("missing_source", "does not exist"),
    ("out_is_a_file", "is a file, not a directory"),
    ("out_under_a_file", "could not write --out"),
])
def test_dvae_export_refuses_wrong_inputs_with_exit_2_and_touches_nothing(case, message, run_dir, tmp_path, capsys):
    notes = write_notes(tmp_path / "notes.txt")
    source, out = run_dir, tmp_path / "export"
    if case == "txt_as_checkpoint":
        source = notes
    elif case == "torch_file_not_a_checkpoint":
        source = tmp_path / "weights.ckpt"
        torch.save({"weights": torch.zeros(2)}, source)
    elif case == "missing_source":
        source = tmp_path / "no_such_run"
    elif case == "out_is_a_file":
        out = notes
    else:
        out = notes / "export"
    assert main([str(source), "--out", str(out)]) == 2
    assert message in one_sentence_error(capsys, "dvae-export")
    assert notes.read_text() == "my notes, not a checkpoint\n"
    user_files = {"notes.txt"} | ({source.name} if source.parent == tmp_path and source.exists() else set())
    assert {p.name for p in tmp_path.iterdir()} == user_files  # nothing written, nothing removed


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(K="32"), "K='32', not a positive integer"),
    (lambda c: c["model"].update(K=-1), "does not describe a DVAE"),
    (lambda c: c.update(format_version="one"), "not a number"),
])
def test_a_hand_edited_dvae_json_is_refused_with_a_sentence(edit, message, exports, tmp_path):
    out = damaged_copy(exports, "safetensors", tmp_path)
    config = json.loads((out / "dvae.json").read_text())
    edit(config)
    (out / "dvae.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        DVAE.from_pretrained(out)


def test_whether_the_decoder_predicts_the_scale_is_read_from_the_weights():
    """A loss=l1 run with scale=learned predicts ln b today; one from before l1 had a scale has C output
    maps only, and its checkpoint still exports (the weights decide, not today's rule)."""
    from dvae.model import DVAEConfig

    hp = {"loss": "l1", "scale_mode": "learned", "channels": 3, "n_hid": 8, "blocks_per_group": 1, "groups": 2,
          "K": 16, "n_init": 8}
    assert DVAEConfig.from_hparams(hp).learned_scale is True
    older = {"decoder.blocks.output.conv.weight": torch.zeros(3, 8, 1, 1)}
    assert DVAEConfig.from_hparams(hp, older).learned_scale is False
    today = {"decoder.blocks.output.conv.weight": torch.zeros(6, 8, 1, 1)}
    assert DVAEConfig.from_hparams(hp, today).learned_scale is True


def test_a_run_that_never_validated_exports_its_last_checkpoint_and_says_so(tmp_path, capsys):
    run = FIXTURES / "v0.1" / "run"  # it has checkpoints/last.ckpt only
    assert main([str(run), "--out", str(tmp_path / "export")]) == 0
    assert "has no best.ckpt (the run never validated); exporting" in capsys.readouterr().err
    assert DVAE.from_pretrained(tmp_path / "export").K == 32
    assert main([str(run), "--checkpoint", "best", "--out", str(tmp_path / "other")]) == 2
    assert "no checkpoints/best.ckpt (it has last.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
