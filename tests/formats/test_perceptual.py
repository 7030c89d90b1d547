"""LPIPS and rFID (dvae.formats.perceptual): agreement with independent references, loading the user's weight
files (and refusing missing or unsafe ones), and the streaming Fréchet distance. All weights here are random."""

import hashlib
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torchvision.models.inception import Inception3

from dvae.errors import ConfigError
from dvae.formats import perceptual
from dvae.formats.perceptual import (
    FID_INCEPTION_FILE,
    LPIPS,
    LPIPS_BACKBONE_FILES,
    FeatureStats,
    FIDInception,
    find_weights,
    frechet_distance,
    load_fid_inception,
    load_lpips,
    lpips_linear_file,
    min_lpips_size,
    published,
)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """TORCH_HOME pointing at an empty folder, so a real cache on this machine is never seen."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def random_heads(net, seed=0):
    channels = (64, 192, 384, 256, 256) if net == "alex" else (64, 128, 256, 512, 512)
    generator = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) / c for k, c in enumerate(channels)}


def backbone_state(model):
    return {f"features.{k}": v.clone() for k, v in model.features.state_dict().items()}


def one_sentence(error):
    message = str(error.value)
    assert "\n" not in message and message.endswith("."), message
    return message


# ---------------------------------------------------------------------------------------------------------- LPIPS


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_torchmetrics(net):
    """Same random backbone and heads in torchmetrics' LPIPS (an independent implementation): same distances."""
    from torchmetrics.functional.image.lpips import _LPIPS

    torch.manual_seed(1)
    ours = LPIPS(net, linear=random_heads(net))
    reference = _LPIPS(pretrained=False, net=net, pnet_rand=True)
    # torchmetrics keeps the features in slices named by their torchvision index: net.slice<k>.<index>.*
    slices = {}
    for name in reference.net.state_dict():
        _, index, param = name.split(".")
        slices[f"{index}.{param}"] = name
    reference.net.load_state_dict({slices[k]: v for k, v in ours.features.state_dict().items()}, strict=True)
    reference.load_state_dict(random_heads(net), strict=False)  # its lins.<k> are the same modules as lin<k>
    for k, weight in random_heads(net).items():
        assert torch.equal(reference.get_parameter(k), weight)
    reference.eval()

    size = 48 if net == "alex" else 32
    x = torch.rand(3, 3, size, size)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():
        expected = reference(x, y, normalize=True).flatten()
        got = ours(x, y)
        assert got.shape == (3,)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        assert (got > 0).all()
        assert torch.equal(ours(x, x), torch.zeros(3))
        # a grey image gives the same distance as one channel repeated
        grey_x, grey_y = x[:, :1], y[:, :1]
        torch.testing.assert_close(ours(grey_x, grey_y), ours(grey_x.expand(-1, 3, -1, -1), grey_y.repeat(1, 3, 1, 1)))


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_min_lpips_size(net):
    model = LPIPS(net)
    side = min_lpips_size(net)
    with torch.no_grad():
        assert model(torch.rand(1, 3, side, side), torch.rand(1, 3, side, side)).shape == (1,)
        with pytest.raises(RuntimeError):
            model(torch.rand(1, 3, side - 1, side - 1), torch.rand(1, 3, side - 1, side - 1))


def test_load_lpips_round_trip(tmp_path, empty_torch_home):
    """A random alexnet state dict under the published name loads, but is reported as not comparable."""
    torch.manual_seed(2)
    source = LPIPS("alex", linear=random_heads("alex", seed=3))
    state = backbone_state(source)
    state["classifier.6.bias"] = torch.zeros(1000)  # the classifier in a torchvision file is ignored
    torch.save(state, tmp_path / LPIPS_BACKBONE_FILES["alex"])
    (tmp_path / "lpips").mkdir()
    torch.save(random_heads("alex", seed=3), tmp_path / "lpips" / "alex.pth")

    model, comparable, files = load_lpips(tmp_path, "alex")
    assert comparable is False  # the sha256 of these random weights does not start with 7be5be79
    assert files == [str(tmp_path / LPIPS_BACKBONE_FILES["alex"]), str(tmp_path / "lpips" / "alex.pth")]
    assert not model.training
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x, y), source(x, y), rtol=0, atol=0)


def test_lpips_linear_file(tmp_path, empty_torch_home):
    """The user's heads first (in DIR/lpips/ or DIR/), else the copy that torchmetrics ships."""
    shipped = lpips_linear_file("vgg", tmp_path)
    assert shipped.name == "vgg.pth" and shipped.parent.name == "lpips_models" and "torchmetrics" in str(shipped)
    torch.save(random_heads("vgg"), tmp_path / "vgg.pth")
    assert lpips_linear_file("vgg", tmp_path) == tmp_path / "vgg.pth"
    (tmp_path / "lpips").mkdir()
    torch.save(random_heads("vgg"), tmp_path / "lpips" / "vgg.pth")
    assert lpips_linear_file("vgg", tmp_path) == tmp_path / "lpips" / "vgg.pth"
    with pytest.raises(ConfigError) as error:
        lpips_linear_file("squeeze", tmp_path)
    assert "squeeze" in one_sentence(error)


def test_missing_heads_is_one_sentence(tmp_path, empty_torch_home, monkeypatch):
    """Without torchmetrics' copy and without the user's, the error says where to get the heads."""
    monkeypatch.setattr(perceptual, "_torchmetrics_heads", lambda net: None)
    with pytest.raises(ConfigError) as error:
        lpips_linear_file("alex", tmp_path)
    message = one_sentence(error)
    assert "alex.pth" in message and str(tmp_path) in message and "--weights DIR" in message
    assert "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth" in message


def test_shipped_heads_load_strictly():
    """The heads file torchmetrics ships has the published keys, and loads into LPIPS as it is."""
    for net in ("alex", "vgg"):
        heads = torch.load(lpips_linear_file(net, None), map_location="cpu", weights_only=True)
        model = LPIPS(net, linear=heads)
        assert torch.equal(model.lin4.model[1].weight, heads["lin4.model.1.weight"])


# ----------------------------------------------------------------------------------------------- files and hashes


def test_published(tmp_path):
    content = b"weights of a published model"
    digest = hashlib.sha256(content).hexdigest()
    good = tmp_path / f"model-{digest[:8]}.pth"
    good.write_bytes(content)
    assert published(good)
    wrong = tmp_path / f"model-{'0' * 8 if not digest.startswith('0' * 8) else 'f' * 8}.pth"
    wrong.write_bytes(content)
    assert not published(wrong)
    unnamed = tmp_path / "model.pth"
    unnamed.write_bytes(content)
    assert not published(unnamed)
    fid = tmp_path / FID_INCEPTION_FILE
    fid.write_bytes(content)
    assert not published(fid)


def test_default_weights_dir_follows_torch_home(empty_torch_home):
    assert perceptual.default_weights_dir() == empty_torch_home


def test_find_weights(tmp_path, empty_torch_home):
    """The given folder first, then torch's cache folder."""
    name = LPIPS_BACKBONE_FILES["vgg"]
    empty_torch_home.mkdir(parents=True)
    (empty_torch_home / name).write_bytes(b"x")
    assert find_weights(name, tmp_path, "LPIPS") == empty_torch_home / name
    (tmp_path / name).write_bytes(b"x")
    assert find_weights(name, tmp_path, "LPIPS") == tmp_path / name


@pytest.mark.parametrize(
    "load, file_name, url",
    [
        (lambda d: find_weights(LPIPS_BACKBONE_FILES["vgg"], d, "LPIPS"), LPIPS_BACKBONE_FILES["vgg"],
         "https://download.pytorch.org/models/vgg16-397923af.pth"),
        (lambda d: load_lpips(d, "alex"), LPIPS_BACKBONE_FILES["alex"],
         "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
        (load_fid_inception, FID_INCEPTION_FILE,
         "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"),
    ],
    ids=["find_weights", "load_lpips", "load_fid_inception"],
)  # fmt: skip
def test_missing_weights_is_one_sentence(tmp_path, empty_torch_home, load, file_name, url):
    weights = tmp_path / "weights"
    weights.mkdir()
    with pytest.raises(ConfigError) as error:
        load(weights)
    message = one_sentence(error)
    assert file_name in message and url in message and str(weights) in message and str(empty_torch_home) in message
    assert "--weights DIR" in message


class Payload:
    """Unpickling this runs os.mkdir(marker): what a planted weights file could do with plain torch.load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("metric", ["lpips", "fid"])
def test_planted_pickle_is_refused(tmp_path, empty_torch_home, metric):
    marker = tmp_path / "payload-ran"
    name = LPIPS_BACKBONE_FILES["alex"] if metric == "lpips" else FID_INCEPTION_FILE
    torch.save({"features.0.weight": Payload(marker)}, tmp_path / name)
    with pytest.raises(ConfigError) as error:
        load_lpips(tmp_path, "alex") if metric == "lpips" else load_fid_inception(tmp_path)
    message = one_sentence(error)
    assert "is not a weights file torch can load safely" in message and str(tmp_path / name) in message
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(tmp_path / name, weights_only=False)
    assert marker.is_dir()


def test_wrong_tensors_are_one_sentence(tmp_path, empty_torch_home):
    """A safe file that holds some other model's tensors names the file and what is missing."""
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / FID_INCEPTION_FILE)
    with pytest.raises(ConfigError) as error:
        load_fid_inception(tmp_path)
    assert "does not hold the FID Inception weights" in one_sentence(error)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / LPIPS_BACKBONE_FILES["alex"])
    with pytest.raises(ConfigError) as error:
        load_lpips(tmp_path, "alex")
    assert "alexnet" in one_sentence(error)


def test_unknown_net_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_lpips(tmp_path, "resnet")
    assert "resnet" in one_sentence(error)


# ------------------------------------------------------------------------------------------------------------ rFID


@pytest.fixture(scope="module")
def fid_state():
    torch.manual_seed(4)
    return FIDInception().state_dict()


def test_fid_inception_file_round_trip(tmp_path, empty_torch_home, fid_state):
    """The random state under the published name loads strictly; pool3 features differ from stock
    torchvision blocks with the same weights (the FID pools matter); a grey image equals its 3-channel copy."""
    torch.save(fid_state, tmp_path / FID_INCEPTION_FILE)
    model, comparable, path = load_fid_inception(tmp_path)
    assert comparable is False and path == str(tmp_path / FID_INCEPTION_FILE) and not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, fid_state[key]), key

    stock = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    stock.load_state_dict(fid_state, strict=True)  # the same keys as torchvision's Inception3
    stock.fc = torch.nn.Identity()
    stock.eval()

    torch.manual_seed(5)
    grey = torch.rand(1, 1, 64, 64)
    images = torch.cat([grey.expand(-1, 3, -1, -1), torch.rand(1, 3, 64, 64)])
    with torch.no_grad():
        features = model(images)
        assert features.shape == (2, 2048) and features.dtype == torch.float32
        assert features.abs().mean() > 1e-3  # random weights that still give real numbers
        plain = stock(F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1)
        assert plain.shape == (2, 2048)
        assert not torch.allclose(features, plain, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(model(grey), features[:1])


def test_fid_inception_rejects_bad_state(fid_state):
    state = dict(fid_state)
    state.pop("fc.bias")
    with pytest.raises(RuntimeError):
        FIDInception(state)
    assert "AuxLogits.fc.weight" not in fid_state and fid_state["fc.weight"].shape == (1008, 2048)


def test_feature_stats_streaming():
    generator = np.random.default_rng(6)
    features = generator.normal(size=(301, 16)) * 3 + 100  # a large mean: where a naive sum of squares loses digits
    stats = FeatureStats()
    for chunk in np.array_split(features, [1, 50, 51, 200]):
        stats.add(torch.from_numpy(chunk))
    assert stats.count == 301
    np.testing.assert_allclose(stats.mean().numpy(), features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance().numpy(), np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12)
    stats32 = FeatureStats()
    stats32.add(torch.from_numpy(features).float())
    assert stats32.mean().dtype == torch.float64


def test_feature_stats_needs_two_images():
    stats = FeatureStats()
    with pytest.raises(ConfigError):
        stats.mean()
    stats.add(torch.zeros(1, 4))
    with pytest.raises(ConfigError) as error:
        stats.covariance()
    one_sentence(error)


def reference_fid(x, y):
    """The textbook formula with scipy's sqrtm, as FID implementations compute it."""
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_x @ cov_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y) - 2 * np.trace(covmean))


def stats_of(array, batch=64):
    stats = FeatureStats()
    for start in range(0, len(array), batch):
        stats.add(torch.from_numpy(array[start : start + batch]))
    return stats


def test_frechet_distance_matches_scipy():
    generator = np.random.default_rng(7)
    mixing = generator.normal(size=(16, 16))
    x = generator.normal(size=(400, 16))
    y = generator.normal(size=(300, 16)) @ mixing * 0.5 + 0.3
    expected = reference_fid(x, y)
    got = frechet_distance(stats_of(x), stats_of(y))
    assert got == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(stats_of(y), stats_of(x)) == pytest.approx(expected, rel=1e-6)
    # close sets: a small distance, still right
    z = x + generator.normal(size=x.shape) * 0.05
    assert frechet_distance(stats_of(x), stats_of(z)) == pytest.approx(reference_fid(x, z), rel=1e-6)
    assert frechet_distance(stats_of(x), stats_of(x)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_rank_deficient():
    """Fewer images than dimensions: singular covariances, where eigenvalues are clamped rather than NaN."""
    generator = np.random.default_rng(8)
    x, y = generator.normal(size=(10, 32)), generator.normal(size=(12, 32))
    got = frechet_distance(stats_of(x), stats_of(y))
    assert np.isfinite(got) and got >= 0
    assert got == pytest.approx(reference_fid(x, y), rel=1e-4)


def test_frechet_distance_dimension_mismatch():
    generator = np.random.default_rng(9)
    with pytest.raises(ConfigError) as error:
        frechet_distance(stats_of(generator.normal(size=(5, 4))), stats_of(generator.normal(size=(5, 3))))
    one_sentence(error)
