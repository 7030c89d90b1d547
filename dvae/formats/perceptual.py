"""Perceptual metrics for image tokenizers: LPIPS (a learned distance between an image and its reconstruction,
computed on ImageNet backbone features) and rFID (the Fréchet distance between Inception pool3 features of the
originals and of the reconstructions).

Both run only from weight files the user already has; nothing is downloaded. A score made with weights other
than the published files is not comparable to published numbers, and callers must label it so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.inception import (
    BasicConv2d,
    Inception3,
    InceptionA,
    InceptionAux,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
)

from dvae.errors import ConfigError, os_error_sentence

LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"

TORCHVISION_URL = "https://download.pytorch.org/models/"
FID_INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_INCEPTION_FILE
LPIPS_LINEAR_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/"

# torch's naming convention for published weights: name-<first hex digits of the sha256>.ext
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")


def default_weights_dir() -> Path:
    """Where torch keeps downloaded weights: $TORCH_HOME/hub/checkpoints (~/.cache/torch/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _url(file_name: str) -> str:
    return FID_INCEPTION_URL if file_name == FID_INCEPTION_FILE else TORCHVISION_URL + file_name


def _folders(weights_dir: Path | None) -> list[Path]:
    folders = [] if weights_dir is None else [Path(weights_dir)]
    default = default_weights_dir()
    return folders + [default] if default not in folders else folders


def _where(folders: list[Path]) -> str:
    return " nor ".join(str(folder) for folder in folders) if len(folders) > 1 else str(folders[0])


def find_weights(file_name: str, weights_dir: Path | None, metric: str) -> Path:
    """The weights file in weights_dir, else in torch's cache folder; a ConfigError sentence when in neither."""
    folders = _folders(weights_dir)
    for folder in folders:
        if (folder / file_name).is_file():
            return folder / file_name
    where = f"in neither {_where(folders)}" if len(folders) > 1 else f"not in {folders[0]}"
    raise ConfigError(
        f"{metric} needs the weights file {file_name}, which is {where}: download it from {_url(file_name)} "
        f"and put it in {default_weights_dir()} or pass --weights DIR with the folder that holds it."
    )


def published(path: Path) -> bool:
    """Whether the file's sha256 starts with the hex digits in its name, as torch's published files do."""
    match = _HASH_IN_NAME.search(Path(path).name)
    if match is None:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest().startswith(match.group(1))


def _check_net(net: str) -> None:
    if net not in LPIPS_BACKBONE_FILES:
        raise ConfigError(f"The LPIPS network must be {' or '.join(LPIPS_BACKBONE_FILES)}, not {net!r}.")


def _torchmetrics_heads(net: str) -> Path | None:
    """The heads file torchmetrics ships, if it is installed and has one."""
    # find_spec locates the package without running its __init__ (which imports most of torchmetrics).
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or spec.origin is None:
        return None
    shipped = Path(spec.origin).parent / "functional" / "image" / "lpips_models" / f"{net}.pth"
    return shipped if shipped.is_file() else None


def lpips_linear_file(net: str, weights_dir: Path | None) -> Path:
    """The LPIPS v0.1 linear heads: the user's copy if there is one, else the one torchmetrics ships."""
    _check_net(net)
    folders = _folders(weights_dir)
    for folder in folders:
        for candidate in (folder / "lpips" / f"{net}.pth", folder / f"{net}.pth"):
            if candidate.is_file():
                return candidate
    shipped = _torchmetrics_heads(net)
    if shipped is not None:
        return shipped
    raise ConfigError(
        f"LPIPS needs its linear heads {net}.pth, which are in neither {_where(folders)} nor torchmetrics: "
        f"download them from {LPIPS_LINEAR_URL}{net}.pth and put them in {folders[0] / 'lpips'} "
        "or pass --weights DIR with a folder that holds them."
    )


def _load_state(path: Path, url: str) -> dict[str, Tensor]:
    """A state dict read with weights_only=True: a file that would run code when unpickled is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise ConfigError(f"Could not read the weights file {os_error_sentence(error)}.") from error
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise ConfigError(
            f"{path} is not a weights file torch can load safely (it holds more than tensors, or is damaged): "
            f"replace it with the file published at {url}."
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state dict of tensors: replace it with the file published at {url}.")
    return state


def _load_into(module: nn.Module, state: dict[str, Tensor], path: Path, what: str, url: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        missing = sorted(set(module.state_dict()) - set(state))
        if not missing:
            detail = "tensors of other shapes"
        else:
            detail = f"no {missing[0]}" + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else "")
        raise ConfigError(f"{path} does not hold {what} ({detail}): use the file published at {url}.") from error


# ---------------------------------------------------------------------------------------------------------- LPIPS

# (torchvision `features` layers up to the last tapped ReLU, the slice ends after which a ReLU output is tapped,
# the channels of each tap). Alexnet taps relu1..relu5, VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_ALEX_TAPS = (2, 5, 8, 10, 12)
_ALEX_CHANNELS = (64, 192, 384, 256, 256)
_VGG_TAPS = (4, 9, 16, 23, 30)
_VGG_CHANNELS = (64, 128, 256, 512, 512)
_VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _alexnet_features() -> nn.Sequential:
    # Same indices as torchvision's alexnet().features, so its state-dict keys load as they are; built here
    # rather than through alexnet() to skip allocating the 58M-parameter classifier.
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
    )  # fmt: skip


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for step in _VGG16_PLAN:
        if step == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(step), kernel_size=3, padding=1), nn.ReLU()]
            channels = int(step)
    return nn.Sequential(*layers)


def min_lpips_size(net: str) -> int:
    """The smallest image side the backbone accepts: alexnet's stride-4 stem and two 3x3/2 pools need 31
    pixels, VGG16's four 2x2 pools before relu5_3 need 16."""
    _check_net(net)
    return 31 if net == "alex" else 16


class _LinearHead(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        # index 0 stands where the published model had its dropout, so the keys read lin<k>.model.1.weight
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance between images in [0, 1]: one number per image pair, 0 for identical images."""

    shift: Tensor
    scale: Tensor

    def __init__(self, net: str = "alex", backbone: dict | None = None, linear: dict | None = None) -> None:
        super().__init__()
        _check_net(net)
        self.net = net
        self.features = _alexnet_features() if net == "alex" else _vgg16_features()
        self.taps = _ALEX_TAPS if net == "alex" else _VGG_TAPS
        channels = _ALEX_CHANNELS if net == "alex" else _VGG_CHANNELS
        for k, c in enumerate(channels):
            self.add_module(f"lin{k}", _LinearHead(c))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        if backbone is None:
            # Kaiming init keeps random features at unit scale through the depth, so tests see real numbers.
            for layer in self.features:
                if isinstance(layer, nn.Conv2d):
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    nn.init.zeros_(layer.bias)
        else:
            self.features.load_state_dict(
                {k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")}, strict=True
            )
        if linear is None:
            for k in range(len(channels)):  # the published heads are non-negative: distances stay >= 0
                head = self.get_submodule(f"lin{k}.model.1")
                nn.init.uniform_(head.weight, 0.0, 1.0 / channels[k])
        else:
            self.heads().load_state_dict(linear, strict=True)
        self.eval().requires_grad_(False)

    def heads(self) -> nn.ModuleDict:
        """The linear heads lin0..lin4, keyed as in the published heads file."""
        return nn.ModuleDict({f"lin{k}": self.get_submodule(f"lin{k}") for k in range(len(self.taps))})

    def _taps(self, x: Tensor) -> list[Tensor]:
        outputs, start = [], 0
        for end in self.taps:
            x = self.features[start:end](x)
            outputs.append(x)
            start = end
        return outputs

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS compares batches of one shape [B, 3 or 1, H, W], got {x.shape} and {y.shape}")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        # Both images go through the backbone as one batch: half the calls, same numbers.
        both = ((torch.cat([x, y]) * 2 - 1) - self.shift) / self.scale
        distance = x.new_zeros(x.shape[0])
        for k, feature in enumerate(self._taps(both)):
            feature = feature / (feature.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fx, fy = feature.chunk(2)
            distance = distance + self.get_submodule(f"lin{k}")((fx - fy).pow(2)).mean(dim=(1, 2, 3))
        return distance


def load_lpips(weights_dir: Path | None, net: str = "alex") -> tuple[LPIPS, bool, list[str]]:
    """LPIPS from the user's files: (model in eval mode, whether the backbone is the published file, files used)."""
    _check_net(net)
    backbone_path = find_weights(LPIPS_BACKBONE_FILES[net], weights_dir, "LPIPS")
    linear_path = lpips_linear_file(net, weights_dir)
    backbone_url = _url(LPIPS_BACKBONE_FILES[net])
    linear_url = f"{LPIPS_LINEAR_URL}{net}.pth"
    backbone = _load_state(backbone_path, backbone_url)
    linear = _load_state(linear_path, linear_url)
    model = LPIPS(net)
    features = {k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")}
    name = "alexnet" if net == "alex" else "vgg16"
    _load_into(model.features, features, backbone_path, f"torchvision {name} weights", backbone_url)
    _load_into(model.heads(), linear, linear_path, f"the LPIPS v0.1 {net} linear heads", linear_url)
    return model.eval(), published(backbone_path), [str(backbone_path), str(linear_path)]


# ------------------------------------------------------------------------------------------------------------ rFID
# The FID Inception is the TF graph of 2015-12-05 ported to torchvision's Inception3: its pools differ from
# torchvision's, and features from the stock blocks would not match published FIDs.


class _FIDInceptionA(InceptionA):
    def forward(self, x: Tensor) -> Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        # TF's average pool leaves the padding out of the mean
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, pool], 1)


class _FIDInceptionC(InceptionC):
    def forward(self, x: Tensor) -> Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, pool], 1)


class _FIDInceptionE(InceptionE):
    def __init__(self, in_channels: int, max_pool: bool = False) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool  # the TF graph's last block (Mixed_7c) max-pools in its pool branch

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


def _fid_inception_e(in_channels: int) -> _FIDInceptionE:
    return _FIDInceptionE(in_channels, max_pool=in_channels == 2048)  # Mixed_7b takes 1280 channels, 7c 2048


class FIDInception(Inception3):
    """The FID Inception: images in [0, 1] -> [B, 2048] pool3 features. Its state-dict keys are torchvision's
    (1008 classes, no aux head), so the pytorch-fid file loads strictly."""

    def __init__(self, state: dict | None = None) -> None:
        blocks = [BasicConv2d, _FIDInceptionA, InceptionB, _FIDInceptionC, InceptionD, _fid_inception_e, InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, inception_blocks=blocks, init_weights=False)
        if state is not None:
            self.load_state_dict(state, strict=True)
        else:
            # Kaiming init keeps random features at unit scale through the 90-odd layers, so tests see real numbers.
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        self.eval().requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FIDInception takes images [B, 3 or 1, H, W], got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):  # fmt: skip
            x = getattr(self, name)(x)
        return torch.flatten(x, 1)


def load_fid_inception(weights_dir: Path | None) -> tuple[FIDInception, bool, str]:
    """The FID Inception from the user's file: (model in eval mode, whether it is the published file, the file)."""
    path = find_weights(FID_INCEPTION_FILE, weights_dir, "rFID")
    state = _load_state(path, FID_INCEPTION_URL)
    model = FIDInception()
    _load_into(model, state, path, "the FID Inception weights", FID_INCEPTION_URL)
    return model.eval(), published(path), str(path)


class FeatureStats:
    """Running mean and covariance of features in float64; memory D x D whatever the number of images.
    Batches are merged with Chan's update, which keeps precision where a raw sum of squares would not."""

    def __init__(self) -> None:
        self.count = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None  # sum of outer products of deviations from the mean

    def add(self, features: Tensor) -> None:
        if features.ndim != 2:
            raise ValueError(f"FeatureStats.add takes features [B, D], got {tuple(features.shape)}")
        batch = features.detach().to("cpu", torch.float64)
        n = batch.shape[0]
        if n == 0:
            return
        mean = batch.mean(dim=0)
        centred = batch - mean
        m2 = centred.T @ centred
        if self._mean is None or self._m2 is None:
            self.count, self._mean, self._m2 = n, mean, m2
            return
        if mean.shape != self._mean.shape:
            raise ValueError(f"FeatureStats got {mean.shape[0]} features after {self._mean.shape[0]}")
        total = self.count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + torch.outer(delta, delta) * (self.count * n / total)
        self.count = total

    def mean(self) -> Tensor:
        if self._mean is None:
            raise ConfigError("There are no features to average: rFID needs at least two images.")
        return self._mean

    def covariance(self) -> Tensor:
        """Unbiased, as numpy.cov(rowvar=False)."""
        if self._m2 is None or self.count < 2:
            raise ConfigError(f"rFID needs at least two images to estimate a covariance, and got {self.count}.")
        return self._m2 / (self.count - 1)


def _sqrt_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a S_b)), in float64."""
    mean_a, mean_b = a.mean(), b.mean()
    cov_a, cov_b = a.covariance(), b.covariance()
    if mean_a.shape != mean_b.shape:
        raise ConfigError(f"The two feature sets have {mean_a.shape[0]} and {mean_b.shape[0]} dimensions.")
    # S_a S_b is not symmetric, but sqrt(S_a) S_b sqrt(S_a) is similar to it and is: same eigenvalues, from eigh.
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = eigenvalues.clamp(min=0).sqrt().sum()
    diff = mean_a - mean_b
    distance = diff @ diff + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return max(float(distance), 0.0)  # rounding can take identical sets a hair below 0
