"""The reconstruction objectives: the exact logit-Laplace density of the DALL·E paper, and the
L1 / MSE losses it is compared against.

Pixels `x` live in [0, 1]. The logit-Laplace density is defined on (0, 1), so pixels are first
mapped away from the end points with `map_pixels` (y = (1 - 2 eps) x + eps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .nll_kernel import fused_logit_laplace_nll

LOSSES = ("logit_laplace", "l1", "mse")


def _check_eps(eps: float) -> None:
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps={eps} must be in [0, 0.5); the paper uses 0.1.")


def map_pixels(x: Tensor, eps: float = 0.1) -> Tensor:
    """[0, 1] -> [eps, 1 - eps], so that logit(y) stays finite (paper, section 2.1)."""
    _check_eps(eps)
    return (1 - 2 * eps) * x + eps


def unmap_pixels(y: Tensor, eps: float = 0.1) -> Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1]: what a person is shown."""
    _check_eps(eps)
    return ((y - eps) / (1 - 2 * eps)).clamp(0.0, 1.0)


def logit_laplace_nll(x: Tensor, mu: Tensor, log_scale: Tensor, eps: float = 0.1,
                      reduction: str = "none") -> Tensor:
    """Elementwise negative log-density (nats) of pixels `x` in [0, 1] under the logit-Laplace
    distribution with location `mu` (in logit space) and scale `b = exp(log_scale)`.

        y   = map_pixels(x, eps)
        nll = |logit(y) - mu| / b + log(2 b) + log(y) + log(1 - y)

    The last two terms (the Jacobian of the sigmoid) make this a density on y in (0, 1). The value
    is per sub-pixel of `y`; `bits_per_dim` adds the Jacobian of `map_pixels` and the 8-bit bin.
    Broadcasts like any torch op, no clamping: a floor on `log_scale` is the model's job. Outside x
    in [0, 1] (the support) the result is not defined. `reduction="mean"` returns the mean over all
    elements, computed in the same pass (faster than `.mean()` on the elementwise result). The
    computation and its analytic gradient live in `nll_kernel.py`.
    """
    _check_eps(eps)
    return fused_logit_laplace_nll(x, mu, log_scale, eps, reduction)


def nll_to_bits_per_dim(nll_nats: Tensor | float, eps: float = 0.1) -> Tensor | float:
    """Mean nll (nats per mapped sub-pixel) -> bits per sub-pixel of an 8-bit image.

    A bin of the 8-bit image is 1/256 wide and `map_pixels` scales widths by (1 - 2 eps):
    bits = (nll + ln 256 - ln(1 - 2 eps)) / ln 2.
    """
    _check_eps(eps)
    return (nll_nats + math.log(256.0) - math.log(1 - 2 * eps)) / math.log(2.0)


def bits_per_dim(x: Tensor, mu: Tensor, log_scale: Tensor, eps: float = 0.1) -> Tensor:
    """Bits per sub-pixel of 8-bit images `x` under the logit-Laplace density (mean over all)."""
    return nll_to_bits_per_dim(logit_laplace_nll(x, mu, log_scale, eps).mean(), eps)


def reconstruct(mu: Tensor, eps: float = 0.1) -> Tensor:
    """The image a person sees from decoder locations `mu`: clamp(unmap(sigmoid(mu)), 0, 1)."""
    return unmap_pixels(torch.sigmoid(mu), eps)


def reconstruction_loss(
    name: str, x: Tensor, mu: Tensor, log_scale: Tensor | None, eps: float = 0.1, reduction: str = "none"
) -> Tensor:
    """Reconstruction loss selected by the `loss=` config key: elementwise, or its mean with
    `reduction="mean"` (one fused pass for the logit-Laplace NLL).

    `l1` and `mse` compare `x` with the unclamped reconstruction (sigmoid(mu) - eps)/(1 - 2 eps),
    the same image the logit-Laplace model would show, so the three losses are comparable.
    """
    if name == "logit_laplace":
        if log_scale is None:
            raise ValueError("loss=logit_laplace needs a log_scale tensor.")
        return logit_laplace_nll(x, mu, log_scale, eps, reduction)
    x_hat = (torch.sigmoid(mu) - eps) / (1 - 2 * eps)
    if name == "l1":
        return F.l1_loss(x_hat, x, reduction=reduction)
    if name == "mse":
        return F.mse_loss(x_hat, x, reduction=reduction)
    raise ValueError(f"loss={name!r} is not known; use one of {', '.join(LOSSES)}.")


def psnr(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-image PSNR (dB) of images in [0, 1]: a tensor of shape [B]."""
    mse = (x - x_hat).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))
