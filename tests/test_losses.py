import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate

from dvae.losses import (
    bits_per_dim,
    logit_laplace_nll,
    map_pixels,
    nll_to_bits_per_dim,
    psnr,
    reconstruct,
    reconstruction_loss,
    unmap_pixels,
)


def reference_nll(x, mu, log_scale, eps):
    """float64 reference from torch.distributions: Laplace log-density of logit(y) minus the
    log-Jacobian of the sigmoid."""
    x, mu, log_scale = (t.double() for t in (x, mu, log_scale))
    y = (1 - 2 * eps) * x + eps
    laplace = torch.distributions.Laplace(mu, log_scale.exp())
    return -(laplace.log_prob(torch.logit(y)) - torch.log(y * (1 - y)))


def laplace_cdf(z, mu, b):
    return 0.5 + 0.5 * math.copysign(1.0, z - mu) * (1 - math.exp(-abs(z - mu) / b))


def test_map_and_unmap_pixels():
    x = torch.linspace(0, 1, 11)
    y = map_pixels(x)
    assert y.min().item() == pytest.approx(0.1) and y.max().item() == pytest.approx(0.9)
    torch.testing.assert_close(unmap_pixels(y), x)
    assert unmap_pixels(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]  # clamped
    with pytest.raises(ValueError, match="eps"):
        map_pixels(x, eps=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nll_matches_float64_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g)
    mu = torch.randn(4, 3, 8, 8, generator=g) * 3
    log_scale = torch.randn(4, 3, 8, 8, generator=g)
    got = logit_laplace_nll(x.to(dtype), mu.to(dtype), log_scale.to(dtype))
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), reference_nll(x, mu, log_scale, 0.1), rtol=tol, atol=tol)


def test_nll_broadcasts_and_does_not_reduce():
    x = torch.rand(2, 3, 4, 4)
    out = logit_laplace_nll(x, torch.zeros(1, 3, 1, 1), torch.zeros(()))
    assert out.shape == (2, 3, 4, 4)


@pytest.mark.parametrize("mu, b", [(0.0, 1.0), (1.3, 0.2), (-2.0, 0.5), (0.4, 3.0)])
@pytest.mark.parametrize("eps", [0.1, 0.0])
def test_density_integrates_to_the_right_mass(mu, b, eps):
    """exp(-nll) is the density of y = map_pixels(x): integrating it over x in [0, 1] (times the
    Jacobian 1 - 2 eps) gives the Laplace mass between logit(eps) and logit(1 - eps); 1 for eps=0."""

    def density_of_x(x):
        nll = logit_laplace_nll(torch.tensor([x], dtype=torch.float64), torch.tensor(mu).double(),
                                torch.tensor(math.log(b)).double(), eps)
        return math.exp(-nll.item()) * (1 - 2 * eps)

    peak = (1 / (1 + math.exp(-mu)) - eps) / (1 - 2 * eps)  # the kink of |logit(y) - mu|
    mass, _ = integrate.quad(density_of_x, 0.0, 1.0, limit=400, points=[peak] if 0 < peak < 1 else None)
    if eps == 0:
        expected = 1.0
    else:
        lo, hi = math.log(eps / (1 - eps)), math.log((1 - eps) / eps)
        expected = laplace_cdf(hi, mu, b) - laplace_cdf(lo, mu, b)
    assert mass == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradient_are_finite_for_extreme_finite_inputs(dtype):
    x = torch.tensor([0.0, 1.0, 0.5, 1e-8, 1 - 1e-7, 0.25] * 4, dtype=dtype)
    mu = torch.tensor([-60.0, 60.0, 0.0, 1e4, -1e4, 5.0] * 4, dtype=dtype).requires_grad_()
    log_scale = torch.tensor([-20.0, -20.0, -20.0, 20.0, 20.0, 0.0] * 4, dtype=dtype).requires_grad_()
    xs = x.clone().requires_grad_()
    nll = logit_laplace_nll(xs, mu, log_scale)
    assert torch.isfinite(nll).all()
    nll.sum().backward()
    for t in (xs, mu, log_scale):
        assert torch.isfinite(t.grad).all()


def test_bits_per_dim_is_the_discretised_likelihood_of_8bit_pixels():
    """For a smooth density the probability of an 8-bit bin is density x bin width, so the bits
    formula must match -log2 of the exact bin probability computed from the Laplace CDF."""
    eps, mu, b = 0.1, 0.3, 0.8
    for k in (3, 64, 128, 200, 251):
        x = k / 255
        nll = logit_laplace_nll(torch.tensor(x).double(), torch.tensor(mu).double(),
                                torch.tensor(math.log(b)).double(), eps)
        bits = nll_to_bits_per_dim(nll, eps).item()
        lo, hi = x - 0.5 / 256, x + 0.5 / 256
        to_z = lambda v: math.log(((1 - 2 * eps) * v + eps) / (1 - ((1 - 2 * eps) * v + eps)))  # noqa: E731
        mass = laplace_cdf(to_z(hi), mu, b) - laplace_cdf(to_z(lo), mu, b)
        assert bits == pytest.approx(-math.log2(mass), rel=2e-3)


def test_bits_per_dim_of_a_batch_is_the_mean():
    x = torch.rand(2, 3, 4, 4)
    mu, ls = torch.randn_like(x), torch.randn_like(x) * 0.1
    expected = nll_to_bits_per_dim(logit_laplace_nll(x, mu, ls).mean())
    torch.testing.assert_close(bits_per_dim(x, mu, ls), expected)


def test_l1_and_mse_are_laplace_and_gaussian_likelihoods_of_the_pixels():
    """loss=l1 / mse: the Laplace / Gaussian negative log-density of each pixel around the unclamped
    reconstruction, with the scale b = exp(log_scale); with a fixed b, L1 and squared error scaled."""
    from torch.distributions import Laplace, Normal

    x = torch.rand(2, 3, 4, 4)
    mu = torch.logit(map_pixels(x)) + 0.3 * torch.randn_like(x)
    log_scale = -2.0 + 0.5 * torch.randn_like(x)
    x_hat = (torch.sigmoid(mu) - 0.1) / 0.8
    torch.testing.assert_close(reconstruction_loss("l1", x, mu, log_scale),
                               -Laplace(x_hat, log_scale.exp()).log_prob(x))
    torch.testing.assert_close(reconstruction_loss("mse", x, mu, log_scale),
                               -Normal(x_hat, log_scale.exp()).log_prob(x))
    fixed = torch.tensor(math.log(0.1))
    torch.testing.assert_close(reconstruction_loss("l1", x, mu, fixed),
                               (x - x_hat).abs() / 0.1 + math.log(0.2))
    perfect = torch.logit(map_pixels(x))
    torch.testing.assert_close(reconstruct(perfect), x, atol=1e-5, rtol=0)
    assert (reconstruction_loss("mse", x, perfect + 1.0, fixed) > reconstruction_loss("mse", x, perfect, fixed)).all()
    with pytest.raises(ValueError, match="loss='huber'"):
        reconstruction_loss("huber", x, mu, log_scale)
    with pytest.raises(ValueError, match="needs a log_scale"):
        reconstruction_loss("l1", x, mu, None)


def test_pixel_bits_per_dim_is_the_mass_of_the_8_bit_bin():
    """For a density over [0, 1] pixels, bits/dim = (nll + ln 256) / ln 2: minus log2 of the bin's mass
    when the density is flat over the bin."""
    from dvae.losses import pixel_nll_to_bits_per_dim

    nll = torch.tensor(-2.0)  # density e^2 over a bin of width 1/256
    assert float(pixel_nll_to_bits_per_dim(nll)) == pytest.approx(-math.log2(math.exp(2.0) / 256))


def test_psnr_per_image():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1
    y[1] += 0.01
    torch.testing.assert_close(psnr(x, y), torch.tensor([20.0, 40.0]))


@pytest.mark.parametrize("x, mu, log_scale, error, match", [
    (torch.zeros(2, dtype=torch.uint8), torch.zeros(2), torch.zeros(2), TypeError, r"x must be a floating.*/ 255"),
    (torch.zeros(2), torch.zeros(3), torch.zeros(2), ValueError, "do not broadcast"),
    (torch.zeros(2), torch.zeros(2), 0.0, TypeError, "log_scale must be a torch.Tensor"),
])
def test_nll_refuses_what_it_cannot_compute_with_a_sentence(x, mu, log_scale, error, match):
    with pytest.raises(error, match=match):
        logit_laplace_nll(x, mu, log_scale)


def test_bits_per_dim_of_no_pixels_is_refused_not_nan():
    with pytest.raises(ValueError, match="at least one pixel"):
        bits_per_dim(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(()))


@pytest.mark.parametrize("size", [32, 16, 11])
def test_ssim_is_scikit_images_structural_similarity(size):
    """The validation SSIM against an independent implementation: scikit-image's, with the Gaussian window of
    Wang et al. (2004) and population statistics."""
    from skimage.metrics import structural_similarity

    from dvae.losses import ssim

    generator = torch.Generator().manual_seed(size)
    x = torch.rand(3, 3, size, size, generator=generator, dtype=torch.float64)
    x_hat = (x + 0.2 * torch.randn(x.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    got = ssim(x, x_hat)
    want = [structural_similarity(a.numpy(), b.numpy(), data_range=1.0, channel_axis=0, gaussian_weights=True,
                                  sigma=1.5, use_sample_covariance=False) for a, b in zip(x, x_hat)]
    assert got.shape == (3,)
    assert got.tolist() == pytest.approx(want, abs=1e-9)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def reference_ms_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """MS-SSIM of one [C, H, W] pair written from Wang, Simoncelli and Bovik (2003) with scipy's filters, apart
    from dvae's code: Gaussian window (sigma 1.5, radius 5), statistics where the window lies inside the image."""
    from scipy.ndimage import correlate1d

    taps = np.exp(-(np.arange(-5, 6) ** 2) / (2 * 1.5**2))
    taps /= taps.sum()

    def local_mean(image):
        filtered = correlate1d(correlate1d(image, taps, axis=1), taps, axis=2)
        return filtered[:, 5:-5, 5:-5]

    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    result = 1.0
    for level, weight in enumerate(weights):
        mx, my = local_mean(x), local_mean(y)
        vx, vy, cxy = local_mean(x * x) - mx**2, local_mean(y * y) - my**2, local_mean(x * y) - mx * my
        cs = (2 * cxy + 0.03**2) / (vx + vy + 0.03**2)
        lum = (2 * mx * my + 0.01**2) / (mx**2 + my**2 + 0.01**2)
        term = (lum * cs).mean() if level == len(weights) - 1 else cs.mean()
        result *= max(term, 0.0) ** weight
        c, h, w = x.shape
        x = x.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
        y = y.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    return result


def test_ms_ssim_is_wang_simoncelli_bovik():
    """MS-SSIM against an independent implementation (scipy filters), and near torchmetrics' (which pads at the
    borders instead of using only the window positions inside the image)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    from dvae.losses import MS_SSIM_MIN_SIZE, ms_ssim

    generator = torch.Generator().manual_seed(3)
    x = F.avg_pool2d(torch.rand(2, 3, 192, 192, generator=generator, dtype=torch.float64), 5, 1, 2)
    x_hat = (x + 0.05 * torch.randn(x.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    got = ms_ssim(x, x_hat)
    assert got.tolist() == pytest.approx([reference_ms_ssim(a.numpy(), b.numpy()) for a, b in zip(x, x_hat)],
                                         abs=1e-9)
    padded = multiscale_structural_similarity_index_measure(x_hat, x, data_range=1.0, reduction="none")
    assert got.tolist() == pytest.approx(padded.tolist(), abs=2e-3)
    assert ms_ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    with pytest.raises(ValueError, match=f"at least {MS_SSIM_MIN_SIZE} pixels"):
        ms_ssim(x[..., :64, :64], x_hat[..., :64, :64])
