"""dvae-eval: the figures it reports (against validation's own, and against hand-counted usage), two models
side by side, and its refusals: one sentence and exit 2, before any weights are read."""

import json
import math

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
    assert "| model | PSNR | SSIM | MS-SSIM | bits/dim |" in printed and "wrote eval.json" in printed
    assert figures["ms_ssim"] is None and "MS-SSIM is not given: its five scales need images of at least 176" in printed
    assert "LPIPS was not asked for" in printed and "rFID was not asked for" in printed
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
    ("shards", "tar shards are a stream without a fixed list of images"),
    ("no_root", "--data imagenet reads its images from a folder you name: pass --data-option root=DIR."),
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
    elif case == "shards":
        data = "webdataset"
    elif case == "no_root":
        data = "imagenet"
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


def test_a_file_that_is_not_an_image_is_one_sentence_before_any_weights_are_read(trained, tmp_path, capsys,
                                                                                   no_weights_read):
    _, model = trained
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    (images / "1.png").write_bytes(b"not a png")
    before = snapshot(tmp_path)
    assert eval_main([str(model), "--data", str(images), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert str(images / "1.png") in one_sentence_error(capsys, "dvae-eval")
    assert snapshot(tmp_path) == before


def test_an_image_damaged_past_its_header_is_one_sentence_naming_it(trained, tmp_path, capsys):
    """Only decoding finds this one, so it stops the evaluation mid-way: still one sentence, and no eval.json."""
    _, model = trained
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), np.uint8)).save(images / f"{i}.png")
    whole = (images / "2.png").read_bytes()
    (images / "2.png").write_bytes(whole[: len(whole) // 2])
    assert eval_main([str(model), "--data", str(images), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert str(images / "2.png") in one_sentence_error(capsys, "dvae-eval")
    assert not (tmp_path / "out" / "eval.json").exists()


def test_validation_dvae_eval_and_dvae_encode_see_a_folders_images_the_same_way(tmp_path):
    """One rule (`evaluation_view`) for every image size: larger, smaller, not square."""
    from dvae.data.datamodule import DVAEDataModule
    from dvae.data.images import load_image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate([(50, 40), (20, 12), (64, 100), (32, 32), (90, 45), (33, 70)]):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(images / f"{i}.png")
    datamodule = DVAEDataModule("folder", root=str(images), crop_size=32, batch_size=2, val_fraction=0.5)
    val = datamodule.val_set
    assert val.num_images == 3
    for i in range(val.num_images):
        assert torch.equal(val[i], load_image(val.files[i], 32)), val.files[i]


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


# --------------------------------------------------------------------------- MS-SSIM, LPIPS and rFID


def photo_folder(path, count=4, size=48):
    path.mkdir()
    rng = np.random.default_rng(1)
    for i in range(count):
        smooth = rng.random((size // 8, size // 8, 3))
        Image.fromarray((np.kron(smooth, np.ones((8, 8, 1))) * 255).astype(np.uint8)).save(path / f"{i}.png")
    return path


@pytest.fixture
def random_backbones(tmp_path, monkeypatch):
    """Randomly initialised AlexNet and FID Inception saved under the published file names (their contents are
    not the published weights, so scores must be labelled not comparable); the real hub cache is hidden."""
    from dvae.formats.perceptual import FID_INCEPTION_FILE, LPIPS, LPIPS_BACKBONE_FILES, FIDInception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(0)
    alexnet_features = {f"features.{k}": v for k, v in LPIPS("alex").features.state_dict().items()}
    torch.save(alexnet_features, weights / LPIPS_BACKBONE_FILES["alex"])  # what LPIPS reads of torchvision's file
    torch.save(FIDInception().state_dict(), weights / FID_INCEPTION_FILE)
    return weights


def test_lpips_and_rfid_with_weights_that_are_not_the_published_ones_are_labelled_so(trained, tmp_path,
                                                                                      random_backbones):
    _, model = trained
    images = photo_folder(tmp_path / "images")
    out = tmp_path / "out"
    assert eval_main([str(model), "--data", str(images), "--out", str(out), "--no-progress",
                      "--metrics", "psnr,lpips,rfid", "--weights", str(random_backbones)]) == 0
    assert eval_main([str(model), "--data", str(images), "--out", str(tmp_path / "all"), "--no-progress",
                      "--metrics", "all", "--weights", str(random_backbones)]) == 0  # MS-SSIM: "–" at 48 px
    everything = json.loads((tmp_path / "all" / "eval.json").read_text())["models"][0]
    assert everything["ms_ssim"] is None and everything["lpips"] > 0 and everything["perplexity"] > 0
    result = json.loads((out / "eval.json").read_text())
    (figures,) = result["models"]
    assert figures["lpips"] > 0 and math.isfinite(figures["rfid"]) and figures["rfid"] >= 0
    assert figures["ssim"] is None and "perplexity" not in figures  # only what was asked for
    assert result["weights"]["lpips"]["comparable"] is False and result["weights"]["rfid"]["comparable"] is False
    table = (out / "eval.md").read_text()
    assert "| model | PSNR | LPIPS | rFID |" in table
    assert table.count("not comparable to published numbers") == 2


def test_a_missing_backbone_file_is_named_with_where_to_get_it_before_any_weights_are_read(
        trained, tmp_path, capsys, monkeypatch, no_weights_read):
    _, model = trained
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    images = photo_folder(tmp_path / "images")
    (tmp_path / "weights").mkdir()
    before = snapshot(tmp_path)
    for metric, file in (("lpips", "alexnet-owt-7be5be79.pth"), ("rfid", "pt_inception-2015-12-05-6726825d.pth")):
        assert eval_main([str(model), "--data", str(images), "--out", str(tmp_path / "out"), "--no-progress",
                          "--metrics", metric, "--weights", str(tmp_path / "weights")]) == 2
        error = one_sentence_error(capsys, "dvae-eval")
        assert file in error and "https://" in error, error
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args, message", [
    (["--metrics", "psnr,fid"], "'fid', which is not a metric"),
    (["--metrics", "ms_ssim"], "ms_ssim needs images of at least 176 pixels"),
    (["--metrics", "lpips", "--size", "16"], "lpips needs images of at least"),
])
def test_metrics_that_cannot_be_computed_are_refused_before_any_weights_are_read(args, message, trained, tmp_path,
                                                                                  capsys, no_weights_read):
    _, model = trained
    assert eval_main([str(model), "--data", "photos", "--out", str(tmp_path / "out"), "--no-progress", *args]) == 2
    assert message in one_sentence_error(capsys, "dvae-eval")


def test_ms_ssim_where_the_size_allows_it(trained, tmp_path):
    from dvae.data.images import load_image
    from dvae.losses import ms_ssim

    _, model = trained
    images = photo_folder(tmp_path / "images", count=2, size=176)
    out = tmp_path / "out"
    assert eval_main([str(model), "--data", str(images), "--size", "176", "--out", str(out), "--no-progress"]) == 0
    (figures,) = json.loads((out / "eval.json").read_text())["models"]
    from dvae import DVAE

    dvae = DVAE.from_pretrained(model)
    x = torch.stack([load_image(images / f"{i}.png", 176) for i in range(2)])
    with torch.inference_mode():
        mu, _ = dvae.split_output(dvae.decoder.forward_tokens(dvae.logits(x).argmax(dim=1)))
    want = float(ms_ssim(x, evaluate_module.reconstruct(mu, dvae.eps)).mean())
    assert figures["ms_ssim"] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("scale", [["scale=learned"], ["scale=constant", "scale.value=0.2"],
                                   ["scale=linear", "scale.start=0.5", "scale.end=0.3", "scale.steps=4"]],
                         ids=["learned", "constant", "scheduled"])
def test_eval_gives_validations_bits_per_dim_for_every_kind_of_scale(scale, tmp_path):
    """A fixed or scheduled scale is not in the weights: dvae-eval takes the b the export recorded (the last
    step's), the one validation used at the end."""
    run = tmp_path / "run"
    train(compose_config([*FAST, *scale]), run_dir=run)
    model = export(run, run / "export", checkpoint="last")  # the weights of the final validation
    assert eval_main([str(model), "--data", "photos", "--data-option", "val_samples=16", "--out",
                      str(tmp_path / "eval"), "--no-progress", "--metrics", "psnr,bits_per_dim"]) == 0
    (figures,) = json.loads((tmp_path / "eval" / "eval.json").read_text())["models"]
    assert figures["bits_per_dim"] == pytest.approx(json.loads((run / "metrics.json").read_text())["bits_per_dim"],
                                                    abs=2e-4)


def test_imagenets_validation_and_the_same_files_as_a_folder_give_the_same_figures(trained, tmp_path):
    """The data config's validation split (the datamodule's) and the folder path see images by one rule."""
    _, model = trained
    root = tmp_path / "imagenet"
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        (root / split / "n01").mkdir(parents=True)
        for i in range(3):
            smooth = rng.random((6, 9, 3))
            picture = (np.kron(smooth, np.ones((10, 10, 1))) * 255).astype(np.uint8)  # 60 x 90, not square
            Image.fromarray(picture).save(root / split / "n01" / f"{i}.JPEG")
    results = []
    for name, data in (("config", ["--data", "imagenet", "--data-option", f"root={root}"]),
                       ("folder", ["--data", str(root / "val")])):
        assert eval_main([str(model), *data, "--size", "32", "--out", str(tmp_path / name), "--no-progress"]) == 0
        results.append(json.loads((tmp_path / name / "eval.json").read_text())["models"][0])
    for key in ("psnr", "ssim", "bits_per_dim", "perplexity"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-6), key
