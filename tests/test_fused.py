"""The fused kernels compute the same function as the straightforward formulas: values and gradients
on fresh random inputs against float64 references (torch.distributions, autograd, gradcheck)."""

import math
import random

import pytest
import torch

from dvae.losses import logit_laplace_nll
from dvae.nll_kernel import COMPILED_MIN_ELEMENTS, fused_logit_laplace_nll, log32, uses_compiled_kernel

EPS = 0.1


def fresh_generator():
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), f"seed {seed}"


def assert_float32_close(got, want, seed, rtol=1.3e-6, atol=1e-5):
    """float32 rounding: torch's default float32 tolerances, the values compared in float64."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{m}\n({seed})")


def reference_nll(x, mu, log_scale, eps=EPS):
    """float64: the Laplace log-density of logit(y) from torch.distributions, minus the sigmoid's
    log-Jacobian; a different route to the same density."""
    y = (1 - 2 * eps) * x + eps
    return -(torch.distributions.Laplace(mu, log_scale.exp()).log_prob(torch.logit(y)) - torch.log(y * (1 - y)))


def values_and_grads(fn, x, mu, log_scale, reduction):
    """fn's output and the gradients (per element: times the element count for a mean) of a random
    weighting of it w.r.t. every input that requires one."""
    out = fn(x, mu, log_scale)
    n = torch.broadcast_shapes(x.shape, mu.shape, log_scale.shape).numel()
    if reduction == "mean":
        out = out.mean() if out.dim() else out  # the reference is elementwise
        weighted, per_element = out, n
    else:
        weights = torch.rand(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        weighted, per_element = (out * weights.to(out.dtype)).sum(), 1
    inputs = [t for t in (x, mu, log_scale) if t.requires_grad]
    return out.detach().double(), [g.double() * per_element for g in torch.autograd.grad(weighted, inputs)]


def random_inputs(shape, scale_shape, dtype, generator, x_grad=False):
    """x in [0, 1], mu in [-4, 4], ln b in [-2, 1]: b >= 0.14 keeps float32's rounding of
    logit(y) - mu (an absolute error of about 1e-7) below 1e-6 in |logit(y) - mu| / b."""
    x = torch.rand(shape, generator=generator, dtype=torch.float64)
    mu = torch.rand(shape, generator=generator, dtype=torch.float64) * 8 - 4
    log_scale = torch.rand(scale_shape, generator=generator, dtype=torch.float64) * 3 - 2
    return [t.to(dtype).requires_grad_(grad) for t, grad in ((x, x_grad), (mu, True), (log_scale, True))]


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("scale_shape", [(2, 3, 8, 8), (), (1, 3, 1, 1)], ids=["per-pixel", "scalar", "per-channel"])
def test_eager_kernel_matches_float64_reference_in_float32(reduction, scale_shape):
    generator, seed = fresh_generator()
    inputs = random_inputs((2, 3, 8, 8), scale_shape, torch.float32, generator, x_grad=True)
    got, got_grads = values_and_grads(
        lambda *t: fused_logit_laplace_nll(*t, EPS, reduction, kernel="eager"), *inputs, reduction)
    reference = [t.detach().double().requires_grad_() for t in inputs]
    want, want_grads = values_and_grads(reference_nll, *reference, reduction)
    assert_float32_close(got, want, seed)
    for g, w, t in zip(got_grads, want_grads, inputs):
        assert g.shape == t.shape, seed  # a broadcast ln b gets a gradient of its own shape
        assert_float32_close(g, w, seed)


@pytest.mark.parametrize("scale_shape", [(3, 4, 5), ()], ids=["per-pixel", "scalar"])
def test_gradcheck_in_float64(scale_shape):
    generator, _ = fresh_generator()
    x, mu, log_scale = random_inputs((3, 4, 5), scale_shape, torch.float64, generator, x_grad=True)
    x = (x.detach() * 0.98 + 0.01).requires_grad_()  # away from 0 and 1, where finite differences leave [0, 1]
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(lambda *t: fused_logit_laplace_nll(*t, EPS, reduction), (x, mu, log_scale))


@pytest.mark.parametrize("scale_shape", [(4096,), ()], ids=["per-pixel", "scalar"])
def test_compiled_kernel_matches_float64_reference(scale_shape):
    generator, seed = fresh_generator()
    x, mu, log_scale = random_inputs((4096,), scale_shape, torch.float32, generator)
    assert uses_compiled_kernel(x, mu, log_scale, EPS, min_elements=0)
    reference = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, mu, log_scale)]
    for reduction in ("none", "mean"):
        got, got_grads = values_and_grads(
            lambda *t: fused_logit_laplace_nll(*t, EPS, reduction, kernel="compiled"), x, mu, log_scale, reduction)
        want, want_grads = values_and_grads(reference_nll, *reference, reduction)
        assert_float32_close(got, want, seed)
        for g, w in zip(got_grads, want_grads):
            assert_float32_close(g, w, seed)


def test_log32_is_within_two_float32_ulps_of_the_logarithm():
    generator, seed = fresh_generator()
    exponents = torch.randint(-126, 128, (100_000,), generator=generator)
    v = torch.ldexp(1 + torch.rand(100_000, generator=generator), exponents.float()).float()
    v = torch.cat([v, torch.tensor([torch.finfo(torch.float32).tiny, 1.0, 0.5, 2.0, 1 - 2**-24, 1 + 2**-23])])
    want = v.double().log()
    ulp = torch.finfo(torch.float32).eps * want.abs().clamp_min(math.log(2) / 2)
    assert ((log32(v).double() - want).abs() / ulp).max() <= 2, seed


def test_no_clamping_at_the_ends_of_the_pixel_range_or_for_large_locations():
    x = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    mu = torch.tensor([40.0, -40.0, -3.0, 3.0, 1e3, -1e3], dtype=torch.float64)
    log_scale = torch.tensor([-4.4, -4.4, 3.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(logit_laplace_nll(x, mu, log_scale), reference_nll(x, mu, log_scale))
    big = [t.float().repeat(COMPILED_MIN_ELEMENTS // 6 + 1) for t in (x, mu, log_scale)]
    assert uses_compiled_kernel(*big, EPS)
    assert_float32_close(logit_laplace_nll(*big).double(), reference_nll(*(t.double() for t in big)), "fixed inputs")


def test_retained_graph_gives_the_same_gradient_twice():
    mu = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = logit_laplace_nll(torch.rand(2, 3, 4, 4), mu, torch.zeros(()), reduction="mean")
    first = torch.autograd.grad(loss, mu, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(loss, mu)[0], first)


def test_bad_reduction_or_kernel_is_refused():
    t = torch.rand(4)
    with pytest.raises(ValueError, match="reduction='sum'"):
        logit_laplace_nll(t, t, t, reduction="sum")
    with pytest.raises(ValueError, match="kernel='fast'"):
        fused_logit_laplace_nll(t, t, t, EPS, kernel="fast")
