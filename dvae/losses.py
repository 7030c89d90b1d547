"""The reconstruction objectives: the exact logit-Laplace density of the DALL·E paper, and the Laplace
(loss=l1) and Gaussian (loss=mse) densities of the pixels it is compared against; and the measures of a
reconstruction that validation and dvae-eval report (PSNR, SSIM, bits/dim).

Pixels `x` live in [0, 1]. The logit-Laplace density is defined on (0, 1), so pixels are first
mapped away from the end points with `map_pixels` (y = (1 - 2 eps) x + eps).
"""

from __future__ import annotations

import math
from itertools import zip_longest
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

from dvae.nll_kernel import fused_logit_laplace_nll

LOSSES = ("logit_laplace", "l1", "mse")


def _check_eps(eps: float) -> None:
    if not isinstance(eps, Real):
        raise TypeError(f"eps must be a number in [0, 0.5), got {type(eps).__name__}; the paper uses 0.1.")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps={eps} must be in [0, 0.5); the paper uses 0.1.")


def _check_float_tensor(name: str, value: object) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}; wrap it with torch.tensor(...).")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got {value.dtype}; convert it with .float() "
            f"(8-bit pixels: x.float() / 255)."
        )


def map_pixels(x: Tensor, eps: float = 0.1) -> Tensor:
    """[0, 1] -> [eps, 1 - eps], so that logit(y) stays finite (paper, section 2.1)."""
    _check_float_tensor("x", x)
    _check_eps(eps)
    return (1 - 2 * eps) * x + eps


def unmap_pixels(y: Tensor, eps: float = 0.1) -> Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1]: what a person is shown."""
    _check_float_tensor("y", y)
    _check_eps(eps)
    return ((y - eps) / (1 - 2 * eps)).clamp(0.0, 1.0)


def check_nll_arguments(x: Tensor, mu: Tensor, log_scale: Tensor, eps: float) -> None:
    """Refuse what `logit_laplace_nll` cannot compute: types, dtypes, devices, shapes, eps.

    Only metadata is looked at (no pass over the values): this runs on every training step."""
    for name, value in (("x", x), ("mu", mu), ("log_scale", log_scale)):
        _check_float_tensor(name, value)
    devices = {t.device for t in (x, mu, log_scale) if t.dim() > 0}
    if len(devices) > 1:
        raise ValueError(f"x, mu and log_scale are on different devices ({', '.join(sorted(map(str, devices)))}); "
                         f"move them to one device.")
    if not _broadcastable(x.shape, mu.shape, log_scale.shape):
        raise ValueError(
            f"x {list(x.shape)}, mu {list(mu.shape)} and log_scale {list(log_scale.shape)} do not broadcast "
            f"to one shape; pass tensors of the same shape (or of size 1 along the other dimensions)."
        )
    _check_eps(eps)


def _broadcastable(*shapes: torch.Size) -> bool:
    """torch's broadcasting rule in plain Python: torch.broadcast_shapes takes about 20 us a call, this 2."""
    for sizes in zip_longest(*(reversed(shape) for shape in shapes), fillvalue=1):
        if len(set(sizes) - {1}) > 1:
            return False
    return True


def logit_laplace_nll(x: Tensor, mu: Tensor, log_scale: Tensor, eps: float = 0.1,
                      reduction: str = "none") -> Tensor:
    """Elementwise negative log-density (nats) of pixels `x` in [0, 1] under the logit-Laplace
    distribution with location `mu` (in logit space) and scale `b = exp(log_scale)`.

        y   = map_pixels(x, eps)
        nll = |logit(y) - mu| / b + log(2 b) + log(y) + log(1 - y)

    The last two terms (the Jacobian of the sigmoid) make this a density on y in (0, 1). The value
    is per sub-pixel of `y`; `bits_per_dim` adds the Jacobian of `map_pixels` and the 8-bit bin.
    Broadcasts like any torch op, no clamping: a floor on `log_scale` is the model's job.
    `reduction="mean"` returns the mean over all elements, computed in the same pass. The computation
    and its analytic gradient are one fused kernel (`nll_kernel.py`). Wrong types, dtypes, devices or
    shapes raise TypeError / ValueError.

    Domain: x in [0, 1], finite mu and log_scale, and |logit(y) - mu| * exp(-log_scale) within the
    dtype's range (float32 / bfloat16: e.g. |mu| <= 1e4 and log_scale >= -20; float16: |mu| <= 100 and
    log_scale >= -4.4, about the model's floor). Inside it the value and its gradient are finite.
    Outside it the result is undefined (inf or NaN) and is not checked: this is the training loss, and
    a pass over the values on every step would cost time; `DVAE.encode` / `decode` and the command-line
    tools check the data they are given.
    """
    check_nll_arguments(x, mu, log_scale, eps)
    return fused_logit_laplace_nll(x, mu, log_scale, eps, reduction)


def logit_laplace_nll_mean(x: Tensor, mu: Tensor, log_scale: Tensor, eps: float = 0.1,
                           fused: bool = False) -> Tensor:
    """mean(logit_laplace_nll(...)): the training loss, in one pass. `fused=True` (`compile.loss=true`)
    uses the compiled kernel whatever the batch size (otherwise only from `COMPILED_MIN_ELEMENTS` on:
    compiling takes a few seconds once per input shape)."""
    check_nll_arguments(x, mu, log_scale, eps)
    return fused_logit_laplace_nll(x, mu, log_scale, eps, "mean", kernel="compiled" if fused else "auto")


def nll_to_bits_per_dim(nll_nats: Tensor | float, eps: float = 0.1) -> Tensor | float:
    """Mean nll (nats per mapped sub-pixel) -> bits per sub-pixel of an 8-bit image.

    A bin of the 8-bit image is 1/256 wide and `map_pixels` scales widths by (1 - 2 eps):
    bits = (nll + ln 256 - ln(1 - 2 eps)) / ln 2.
    """
    _check_eps(eps)
    return (nll_nats + math.log(256.0) - math.log(1 - 2 * eps)) / math.log(2.0)


def bits_per_dim(x: Tensor, mu: Tensor, log_scale: Tensor, eps: float = 0.1) -> Tensor:
    """Bits per sub-pixel of 8-bit images `x` under the logit-Laplace density (mean over all)."""
    nll = logit_laplace_nll(x, mu, log_scale, eps)
    if nll.numel() == 0:
        raise ValueError(f"bits_per_dim needs at least one pixel, got tensors of shape {list(nll.shape)}.")
    return nll_to_bits_per_dim(nll.mean(), eps)


def reconstruct(mu: Tensor, eps: float = 0.1) -> Tensor:
    """The image a person sees from decoder locations `mu`: clamp(unmap(sigmoid(mu)), 0, 1)."""
    return unmap_pixels(torch.sigmoid(mu), eps)


def reconstruction_loss(
    name: str, x: Tensor, mu: Tensor, log_scale: Tensor | None, eps: float = 0.1
) -> Tensor:
    """Elementwise negative log-likelihood (nats per sub-pixel) selected by the `loss=` config key
    (training takes the logit-Laplace mean in one pass with `logit_laplace_nll_mean`).

    `l1` and `mse` are the Laplace and Gaussian densities over the pixel value, centred on the unclamped
    reconstruction x_hat = (sigmoid(mu) - eps)/(1 - 2 eps) (the image the logit-Laplace model would show)
    with scale b = exp(log_scale), learned or scheduled like the logit-Laplace's:
    |x - x_hat| / b + ln 2b, and (x - x_hat)^2 / 2b^2 + ln b + ln(2 pi)/2. So the three are likelihoods of
    the same pixels, their KL and usage weights mean the same, and each has bits/dim; with a constant b
    they are plain L1 and MSE, scaled.
    """
    if log_scale is None:
        raise ValueError(f"loss={name} needs a log_scale tensor (a learned or scheduled scale).")
    if name == "logit_laplace":
        return logit_laplace_nll(x, mu, log_scale, eps)
    if name not in LOSSES:
        raise ValueError(f"loss={name!r} is not known; use one of {', '.join(LOSSES)}.")
    x_hat = (torch.sigmoid(mu) - eps) / (1 - 2 * eps)
    log_scale = log_scale.float()
    if name == "l1":
        return (x - x_hat).abs() * torch.exp(-log_scale) + log_scale + math.log(2.0)
    return 0.5 * ((x - x_hat) * torch.exp(-log_scale)).square() + log_scale + 0.5 * math.log(2 * math.pi)


def pixel_nll_to_bits_per_dim(nll_nats: Tensor | float) -> Tensor | float:
    """Mean nll of a density over pixel values in [0, 1] (loss=l1, mse) -> bits per sub-pixel of an 8-bit
    image: (nll + ln 256) / ln 2. The Laplace and Gaussian put a little mass outside [0, 1], so the
    figure is slightly pessimistic."""
    return (nll_nats + math.log(256.0)) / math.log(2.0)


def psnr(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-image PSNR (dB) of images in [0, 1]: a tensor of shape [B]."""
    mse = (x - x_hat).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _ssim_terms(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """[B] SSIM and [B] contrast-structure term (SSIM without its luminance factor), each averaged over the
    valid window positions and the channels: Gaussian window (sigma 1.5, 11x11, or the largest that fits),
    K1 = 0.01, K2 = 0.03."""
    radius = min(5, (min(x.shape[-2:]) - 1) // 2)
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(taps**2) / (2 * 1.5**2))
    g = g / g.sum()
    channels = x.shape[1]
    rows, cols = g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def local_mean(t: Tensor) -> Tensor:  # separable Gaussian filter, valid positions only
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = local_mean(x), local_mean(x_hat)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(x_hat * x_hat) - mu_y**2
    cov = local_mean(x * x_hat) - mu_x * mu_y
    contrast_structure = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3)), contrast_structure.mean(dim=(1, 2, 3))


def ssim(x: Tensor, x_hat: Tensor) -> Tensor:
    """[B] structural similarity of each reconstruction to its original (images in [0, 1]), as Wang et al. (2004)
    and scikit-image's `structural_similarity(gaussian_weights=True, use_sample_covariance=False)` define it:
    Gaussian-weighted local statistics (sigma 1.5, an 11x11 window), K1 = 0.01, K2 = 0.03, averaged over the
    positions where the window lies inside the image and over the channels. An image smaller than the window
    gets the largest window that fits."""
    return _ssim_terms(x, x_hat)[0]


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli and Bovik (2003), five scales
MS_SSIM_MIN_SIZE = 11 * 2 ** (len(MS_SSIM_WEIGHTS) - 1)  # the 11x11 window must fit the coarsest scale: 176 px


def ms_ssim(x: Tensor, x_hat: Tensor) -> Tensor:
    """[B] multi-scale SSIM (Wang, Simoncelli and Bovik, 2003) of images in [0, 1] of at least
    MS_SSIM_MIN_SIZE pixels a side: the contrast-structure term at the four finer scales and the full SSIM at
    the coarsest, each raised to its weight and multiplied; 2x2 average pooling between scales. Negative terms
    (anti-correlated structure) are clamped to 0 so the power stays real."""
    if min(x.shape[-2:]) < MS_SSIM_MIN_SIZE:
        raise ValueError(f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIZE} pixels a side, not "
                         f"{tuple(x.shape[-2:])}.")
    result = torch.ones(len(x), dtype=x.dtype, device=x.device)
    for scale, weight in enumerate(MS_SSIM_WEIGHTS):
        full, contrast_structure = _ssim_terms(x, x_hat)
        term = full if scale == len(MS_SSIM_WEIGHTS) - 1 else contrast_structure
        result = result * term.clamp_min(0.0) ** weight
        x, x_hat = F.avg_pool2d(x, 2), F.avg_pool2d(x_hat, 2)
    return result
