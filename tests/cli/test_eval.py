"""dvae-eval: the figures it reports (against validation's own, and against hand-counted usage), two models
side by side, and its refusals: one sentence and exit 2, before any weights are read."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import dvae.formats.evaluate as evaluate_module
from dvae.cli.evaluate import main as eval_main
from dvae.formats.checkpoint import export
from dvae.formats.evaluate import usage_figures
from dvae.training.run import train
from tests.cli.conftest import TINY, snapshot
from tests.conftest import FAST, compose_config, one_sentence_error


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few steps on the photos' 32-pixel validation crops, and its export."""
    run = tmp_path_factory.mktemp("run")
    train(compose_config([*FAST, "data.val_samples=24"]), run_dir=run)
    return run, export(run, run / "export")


def test_usage_figures_of_a_hand_made_token_set():
    tokens = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)  # K = 8: three codes used, 6:3:1
    figures = usage_figures(torch.bincount(tokens, minlength=8), top=2)
    p = torch.tensor([0.6, 0.3, 0.1])
    assert figures["codes_used"] == 3 and figures["codes_used_fraction"] == 3 / 8
    assert figures["perplexity"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert figures["top10_share"] == pytest.approx(0.9)  # the two most frequent codes take 9 of 10 tokens


def test_eval_on_the_validation_set_gives_validations_figures(trained, tmp_path, capsys):
    """The same images, the same crops, the same weights (the EMA's, which validation uses): the same numbers."""
    run, model = trained
    assert eval_main([str(model), "--data", "photos", "--data-option", "val_samples=24", "--out",
                      str(tmp_path / "eval"), "--no-progress"]) == 0
    validation = json.loads((run / "metrics.json").read_text())
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    (figures,) = result["models"]
    assert result["images"] == validation["val_images"] == 24
    for key in ("psnr", "ssim", "bits_per_dim"):
        assert figures[key] == pytest.approx(validation[key], abs=2e-4), key
    assert figures["codes_used_fraction"] == pytest.approx(validation["codes_used_fraction"])
    assert figures["perplexity"] == pytest.approx(validation["perplexity"], rel=1e-4)
    assert figures["tokens_per_second"] > 0
    printed = capsys.readouterr().out
    assert "| model | PSNR | SSIM | bits/dim |" in printed and "wrote eval.json" in printed
    with Image.open(tmp_path / "eval" / "eval_grid.png") as grid:
        assert grid.width > 8 * 32 and grid.height > 2 * 32  # originals above the reconstructions
    assert (tmp_path / "eval" / "eval_usage.png").stat().st_size > 0
    assert (tmp_path / "eval" / "eval_atlas.png").stat().st_size > 0


def test_two_models_are_compared_on_the_same_images(trained, tmp_path):
    _, model = trained
    other = tmp_path / "untrained"
    torch.manual_seed(0)
    from dvae import DVAE

    DVAE(**{**TINY, "K": 32}).save_pretrained(other, metadata={"image_size": 32})
    assert eval_main([str(model), str(other), "--data", "photos", "--data-option", "val_samples=8", "--out",
                      str(tmp_path / "ab"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "ab" / "eval.json").read_text())
    assert [m["path"] for m in result["models"]] == [str(model.resolve()), str(other.resolve())]
    assert result["models"][0]["psnr"] != result["models"][1]["psnr"]
    table = (tmp_path / "ab" / "eval.md").read_text()
    assert "| export |" in table and "| untrained |" in table


@pytest.fixture
def no_weights_read(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were read before the input was checked")

    monkeypatch.setattr(evaluate_module.DVAE, "from_pretrained", refuse)


@pytest.mark.parametrize("case, message", [
    ("not_an_export", "has no dvae.json"),
    ("empty_folder", "contains no image files"),
    ("size_not_a_multiple", "--size 30 is not a positive multiple of the model's downsampling factor 4"),
    ("out_not_empty", "is not empty"),
    ("other_channels", "reads 1-channel images but"),
])
def test_bad_input_is_one_sentence_before_any_weights_are_read(case, message, trained, tmp_path, capsys,
                                                                no_weights_read):
    _, model = trained
    models, data, args, out = [str(model)], "photos", [], tmp_path / "out"
    if case == "not_an_export":
        (tmp_path / "notes").mkdir()
        models = [str(tmp_path / "notes")]
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        data = str(tmp_path / "empty")
    elif case == "size_not_a_multiple":
        args = ["--size", "30"]
    elif case == "out_not_empty":
        out.mkdir()
        (out / "mine.txt").write_text("keep me\n")
    else:
        from dvae import DVAE

        DVAE(**{**TINY, "channels": 1}).save_pretrained(tmp_path / "grey", metadata={"image_size": 32})
        models.append(str(tmp_path / "grey"))
    before = snapshot(tmp_path)
    assert eval_main([*models, "--data", data, "--out", str(out), "--no-progress", *args]) == 2
    assert message in one_sentence_error(capsys, "dvae-eval")
    assert snapshot(tmp_path) == before


def test_a_damaged_image_is_one_sentence_naming_it(trained, tmp_path, capsys):
    _, model = trained
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    (images / "1.png").write_bytes(b"not a png")
    assert eval_main([str(model), "--data", str(images), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert str(images / "1.png") in one_sentence_error(capsys, "dvae-eval")
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_the_atlas_shows_every_code_decoded_alone_most_used_first():
    from dvae import DVAE
    from dvae.formats.evaluate import codebook_atlas

    torch.manual_seed(0)
    model = DVAE(**{**TINY, "K": 9}).eval()  # 4x4 pixels per code, enlarged to 16
    counts = torch.tensor([0, 5, 0, 9, 1, 0, 0, 0, 2])
    atlas = codebook_atlas(model, counts)
    assert atlas.shape == (3, 1 + 3 * 17, 1 + 3 * 17)  # 3 x 3 patches of 16 pixels, 1-pixel white gaps
    with torch.inference_mode():
        mu, _ = model.split_output(model.decoder.forward_tokens(torch.tensor([[[3]]])))
    most_used = torch.nn.functional.interpolate(evaluate_module.reconstruct(mu, model.eps), scale_factor=4)[0]
    torch.testing.assert_close(atlas[:, 1:17, 1:17], most_used)  # code 3 (9 uses) comes first
