"""`DVAE`: the network alone (no Lightning), the object users encode and decode with."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvae.errors import ConfigError
from dvae.losses import map_pixels, reconstruct
from dvae.nn.codebook import GumbelCodebook
from dvae.nn.decoder import Decoder
from dvae.nn.encoder import Encoder
from dvae.pretrained import CONFIG_FILE, load_state, read_config, save_pretrained

# ln b is kept above the logit-space width of one 8-bit step at mid-grey,
# ln((1 - 2 eps) / 256 / (0.5 * 0.5)) with eps = 0.1: without a floor the density on pixels the
# model predicts exactly grows without bound as b -> 0 (paper-facts.md).
DEFAULT_LOG_SCALE_FLOOR = math.log(0.8 / 256 / 0.25)


def predicts_scale(loss: str, scale_mode: str) -> bool:
    """Whether the decoder outputs ln b too (2*C maps): with a learned scale, for every loss (each is a
    likelihood with a scale, `reconstruction_loss`). Training, export and `init_from` all build the
    decoder by this one rule. (`loss` no longer decides it; checkpoints of l1/mse runs made before it
    stopped deciding it are read by their weights: `DVAEConfig.from_hparams`, `resume.check_decoder_output`.)"""
    return scale_mode == "learned"


# The decoder's last convolution: 2*C output maps when it predicts the scale, C when it does not.
DECODER_OUTPUT_WEIGHT = "decoder.blocks.output.conv.weight"


@dataclass(frozen=True)
class DVAEConfig:
    """Everything that defines a DVAE's network, and nothing else: one object from the YAML (`model.*`,
    `data.channels`, `pixel_eps`, `scale.log_floor`) to the checkpoint's hyper-parameters, dvae.json's
    "model" section and `DVAE.from_pretrained`. The field names are those of the config and of files already
    written. Adding a network option is a field here and its key in configs/model/*.yaml."""

    channels: int = 3  # image channels
    n_hid: int = 256  # width of the first residual group; each group doubles it
    blocks_per_group: int = 2  # residual blocks per group
    groups: int = 4  # groups of blocks; the image is downsampled 2**(groups - 1) times per side
    K: int = 8192  # codebook size: the number of distinct tokens
    n_init: int = 128  # the dimension D of a code vector (the decoder's input width)
    learned_scale: bool = True  # the decoder predicts ln b (2*C output maps), as in the paper
    log_scale_floor: float = DEFAULT_LOG_SCALE_FLOOR  # the soft floor on ln b (config scale.log_floor)
    eps: float = 0.1  # pixels are mapped into [eps, 1 - eps] (config pixel_eps)
    hard: bool = False  # straight-through one-hot samples instead of soft ones

    def __post_init__(self):
        # numpy and torch scalars are taken and stored as Python's, so dvae.json always holds plain JSON numbers
        for name in ("channels", "n_hid", "groups", "blocks_per_group", "K", "n_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"model.{name}={value!r} must be a positive integer.")
            object.__setattr__(self, name, int(value))
        for name, key in (("log_scale_floor", "scale.log_floor"), ("eps", "pixel_eps")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{key}={value!r} must be a number.")
            object.__setattr__(self, name, float(value))
        for name in ("learned_scale", "hard"):
            value = getattr(self, name)
            if value not in (True, False) or isinstance(value, float):
                raise ValueError(f"{name}={value!r} must be true or false.")
            object.__setattr__(self, name, bool(value))
        if self.K < 2:
            raise ValueError(f"model.K={self.K} must be at least 2 codes.")
        if not math.isfinite(self.log_scale_floor):
            raise ValueError(f"scale.log_floor={self.log_scale_floor} must be a finite number; the default is "
                             f"{DEFAULT_LOG_SCALE_FLOOR:.3f} (use e.g. -20 for almost no floor).")
        if not 0.0 <= self.eps < 0.5:
            raise ValueError(f"pixel_eps={self.eps} must be in [0, 0.5); the paper uses 0.1.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hparams(cls, hp: Mapping[str, Any], state: Mapping[str, Tensor] | None = None) -> DVAEConfig:
        """The network of a training run from `DVAELightning`'s hyper-parameters (flat, as checkpoints hold
        them). Whether the decoder predicts the scale is read from its weights where `state` is given:
        runs of loss=l1/mse made before those losses had a scale have no scale output even with scale=learned."""
        values = {f.name: hp[f.name] for f in fields(cls) if f.name in hp}
        for name in ("n_hid", "blocks_per_group", "groups", "K", "n_init"):  # no default: the weights need them
            if name not in values:
                raise KeyError(name)
        values["eps"] = hp.get("pixel_eps", values.get("eps", 0.1))
        values["learned_scale"] = predicts_scale(hp.get("loss", "logit_laplace"), hp.get("scale_mode", "learned"))
        output = (state or {}).get(DECODER_OUTPUT_WEIGHT)
        if output is not None:
            values["learned_scale"] = output.shape[0] == 2 * values.get("channels", 3)
        if values.get("log_scale_floor") is None:
            values["log_scale_floor"] = DEFAULT_LOG_SCALE_FLOOR
        return cls(**values)


class DVAEOutput(NamedTuple):
    logits: Tensor  # (B, K, h, w) encoder logits
    mu: Tensor  # (B, C, H, W) logit-space locations
    log_scale: Tensor | None  # (B, C, H, W) ln b when the scale is learned, else None


class DVAE(nn.Module):
    """Encoder -> Gumbel codebook -> decoder, on images in [0, 1] (pixels are mapped inside).

    `learned_scale=True` is the paper's decoder (2*C output maps: mu and ln b); `False` outputs C
    maps and the caller supplies the scale.

    The floor on ln b: the logit-Laplace density of a pixel the decoder predicts exactly grows
    without bound as b -> 0, so training pushes b towards 0 on flat regions (on a batch of one flat
    image a tiny model takes ln b from -1.7 to past -4.9 in 150 steps without the floor; see
    tests/test_model.py) and the loss towards -inf. ln b is therefore softly floored,
    ln b = floor + softplus(raw - floor) > floor, at `log_scale_floor` (config `scale.log_floor`;
    default `DEFAULT_LOG_SCALE_FLOOR` = -4.382, the logit-space width of one 8-bit step at mid-grey).
    """

    def __init__(self, config: DVAEConfig | None = None, /, **overrides):
        """`DVAE(DVAEConfig(...))`, or the config's fields as keywords: `DVAE(K=512, n_hid=32)`."""
        super().__init__()
        if config is not None and not isinstance(config, DVAEConfig):
            raise TypeError(f"DVAE takes a DVAEConfig, or the network's fields as keywords (DVAE(K=512, n_hid=32)); "
                            f"got {type(config).__name__}.")
        c = self.config = DVAEConfig(**overrides) if config is None else replace(config, **overrides)
        self.encoder = Encoder(c.channels, c.n_hid, c.blocks_per_group, c.groups, c.K)
        self.quantizer = GumbelCodebook(c.K, hard=c.hard)
        out = 2 * c.channels if c.learned_scale else c.channels
        self.decoder = Decoder(out, c.n_hid, c.blocks_per_group, c.groups, c.K, c.n_init)

    # Read-only views of the config: the config is what an export writes, so it must be what the network is.
    @property
    def channels(self) -> int:
        return self.config.channels

    @property
    def K(self) -> int:
        return self.config.K

    @property
    def groups(self) -> int:
        return self.config.groups

    @property
    def eps(self) -> float:
        return self.config.eps

    @property
    def learned_scale(self) -> bool:
        return self.config.learned_scale

    @property
    def log_scale_floor(self) -> float:
        return self.config.log_scale_floor

    @property
    def downsampling(self) -> int:
        """Pixels per token along each side: 2**(groups - 1) (8 in the paper)."""
        return 2 ** (self.groups - 1)

    @property
    def codebook(self) -> Tensor:
        """[K, D]: the code vectors the decoder reads (its input projection's weight)."""
        return self.decoder.codebook

    def check_images(self, images: Tensor) -> None:
        """Raise a ValueError saying what to pass when `images` cannot go through the encoder."""
        if not isinstance(images, Tensor):
            raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}.")
        if images.dim() != 4:
            raise ValueError(
                f"images must have shape [B, {self.channels}, H, W], got a rank-{images.dim()} "
                f"tensor of shape {list(images.shape)}; add a batch dimension with images[None]."
            )
        if images.shape[1] != self.channels:
            raise ValueError(
                f"images must have {self.channels} channels in dimension 1, got shape "
                f"{list(images.shape)}; pass [B, {self.channels}, H, W] (channels first)."
            )
        if not images.is_floating_point():
            raise ValueError(
                f"images must be floating point in [0, 1], got {images.dtype}; "
                "convert uint8 images with images.float() / 255."
            )
        f = self.downsampling
        h, w = images.shape[-2:]
        if h % f or w % f or h == 0 or w == 0:
            raise ValueError(
                f"image height and width must be positive multiples of {f} (the downsampling "
                f"factor), got {h}x{w}; crop or resize to e.g. {max(f, h // f * f)}x{max(f, w // f * f)}."
            )

    def check_image_values(self, images: Tensor) -> None:
        """Raise a ValueError unless every pixel is finite and in [0, 1]. A pass over the data: done by
        `encode`, the entry point for users' images, not on every training step."""
        if images.numel() == 0:
            return
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contain NaN or infinite values; pass finite pixels in [0, 1].")
        low, high = (float(v) for v in torch.aminmax(images))
        if low < 0.0 or high > 1.0:
            hint = "; 8-bit images go in as images.float() / 255" if high > 1.0 else ""
            raise ValueError(f"images must be in [0, 1], got values in [{low:g}, {high:g}]{hint}.")

    def check_tokens(self, tokens: Tensor) -> Tensor:
        """The tokens as int64, or a ValueError saying what to pass (shape, dtype, range, device)."""
        if not isinstance(tokens, Tensor):
            raise ValueError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}.")
        if tokens.dim() != 3:
            raise ValueError(
                f"tokens must have shape [B, h, w], got shape {list(tokens.shape)}; "
                "add a batch dimension with tokens[None]."
            )
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integers, got {tokens.dtype}; use tokens.long().")
        if 0 in tokens.shape[1:]:
            raise ValueError(f"a token grid must be at least 1x1, got shape {list(tokens.shape)}.")
        self._check_device(tokens, "tokens")
        tokens = tokens.long()  # unsigned types have no min/max in torch; uint64 >= 2**63 turns negative
        if tokens.numel():
            low, high = (int(v) for v in torch.aminmax(tokens))
            if low < 0 or high >= self.K:
                raise ValueError(
                    f"tokens must be in [0, {self.K}) for this model (K={self.K}), got values in [{low}, {high}]."
                )
        return tokens

    def _check_device(self, tensor: Tensor, name: str) -> None:
        device = self.codebook.device
        if tensor.device != device:
            raise ValueError(f"{name} are on {tensor.device} but the model is on {device}; "
                             f"move them with .to('{device}').")

    def logits(self, images: Tensor) -> Tensor:
        """Images [B, C, H, W] in [0, 1] -> code logits [B, K, H/f, W/f]. Checks the shape and dtype
        only (it runs on every training step); `encode` checks the values too."""
        self.check_images(images)
        return self.encoder(map_pixels(images, self.eps))

    def encode(self, images: Tensor) -> Tensor:
        """Images [B, C, H, W] in [0, 1] -> argmax tokens [B, H/f, W/f] (int64): no noise.

        Any floating dtype is accepted (converted to the model's); NaN, infinite or out-of-range
        pixels, a wrong shape or another device raise a ValueError."""
        self.check_images(images)
        self._check_device(images, "images")
        self.check_image_values(images)
        return GumbelCodebook.tokens(self.logits(images.to(self.codebook.dtype)))

    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens [B, h, w] (any integer dtype) -> images [B, C, h*f, w*f] in [0, 1]."""
        tokens = self.check_tokens(tokens)
        mu, _ = self.split_output(self.decoder.forward_tokens(tokens))
        return reconstruct(mu, self.eps)

    def kl_per_subpixel(self, logits: Tensor, images: Tensor) -> Tensor:
        """KL(q || uniform prior) summed over the latent positions, averaged over the batch and divided by
        the sub-pixels of one image: the paper's normalisation of the ELBO (training, validation, dvae-eval)."""
        return self.quantizer.kl_to_uniform(logits).sum(dim=(1, 2)).mean() / images[0].numel()

    def split_output(self, out: Tensor) -> tuple[Tensor, Tensor | None]:
        """Decoder output -> (mu, ln b or None); ln b goes through the soft floor."""
        if not self.learned_scale:
            return out, None
        mu, raw = out.float().chunk(2, dim=1)
        floor = self.log_scale_floor
        return mu, floor + F.softplus(raw - floor)

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> DVAE:
        """The model of an export directory (dvae-export or `save_pretrained`), in eval mode on
        `device`: torch alone rebuilds it, without Hydra, Lightning or the training checkpoint."""
        path = Path(path)
        config = read_config(path)
        try:  # built on the meta device: no time goes into a random initialisation that is thrown away
            with torch.device("meta"):
                model = cls(**config["model"])
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{path / CONFIG_FILE}: the 'model' section does not describe a DVAE ({error}); "
                              f"export the model again.") from error
        model.load_state_dict(load_state(path, config, model.state_dict()), strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path, format: str = "safetensors", force: bool = False,
                        metadata: dict | None = None) -> None:
        """Write an export directory `from_pretrained` reads back (format: safetensors, npy or pt);
        refuses a non-empty directory unless `force`."""
        save_pretrained(self, path, format=format, force=force, metadata=metadata)

    def forward(self, images: Tensor, tau: float = 1.0) -> DVAEOutput:
        """One training pass: logits, a Gumbel-softmax sample at temperature tau, and the
        decoder's distribution parameters."""
        logits = self.logits(images)
        embedded = self.quantizer.project(logits, tau, self.decoder.blocks.input)
        mu, log_scale = self.split_output(self.decoder.forward_embedded(embedded))
        return DVAEOutput(logits, mu.float(), log_scale)
