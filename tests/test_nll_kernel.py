"""The fused logit-Laplace kernel (eager and compiled) computes the same function as the straightforward
formula: values and gradients on fresh random inputs against float64 references (torch.distributions,
autograd, gradcheck), directly and through the training loss's `fused=True`."""

import functools
import math
import random

import pytest
import torch

import dvae.nll_kernel
from dvae.losses import logit_laplace_nll, logit_laplace_nll_mean
from dvae.nll_kernel import COMPILED_MIN_ELEMENTS, exp32, fused_logit_laplace_nll, log32, uses_compiled_kernel

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
    nll = functools.partial(fused_logit_laplace_nll, eps=EPS, reduction=reduction, kernel="eager")
    got, got_grads = values_and_grads(nll, *inputs, reduction)
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
        nll = functools.partial(fused_logit_laplace_nll, eps=EPS, reduction=reduction)
        assert torch.autograd.gradcheck(nll, (x, mu, log_scale))


@pytest.mark.parametrize("scale_shape", [(4096,), ()], ids=["per-pixel", "scalar"])
def test_compiled_kernel_matches_float64_reference(scale_shape):
    generator, seed = fresh_generator()
    x, mu, log_scale = random_inputs((4096,), scale_shape, torch.float32, generator)
    assert uses_compiled_kernel(x, mu, log_scale, EPS, min_elements=0)
    reference = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, mu, log_scale)]
    for reduction in ("none", "mean"):
        nll = functools.partial(fused_logit_laplace_nll, eps=EPS, reduction=reduction, kernel="compiled")
        got, got_grads = values_and_grads(nll, x, mu, log_scale, reduction)
        want, want_grads = values_and_grads(reference_nll, *reference, reduction)
        assert_float32_close(got, want, seed)
        for g, w in zip(got_grads, want_grads):
            assert_float32_close(g, w, seed)
    assert not dvae.nll_kernel._compile_failed, "the compiled kernel fell back to the eager one"


def test_log32_is_within_two_float32_ulps_of_the_logarithm():
    generator, seed = fresh_generator()
    exponents = torch.randint(-126, 128, (100_000,), generator=generator)
    v = torch.ldexp(1 + torch.rand(100_000, generator=generator), exponents.float()).float()
    v = torch.cat([v, torch.tensor([torch.finfo(torch.float32).tiny, 1.0, 0.5, 2.0, 1 - 2**-24, 1 + 2**-23])])
    want = v.double().log()
    ulp = torch.finfo(torch.float32).eps * want.abs().clamp_min(math.log(2) / 2)
    assert ((log32(v).double() - want).abs() / ulp).max() <= 2, seed


def test_exp32_is_within_two_float32_ulps_of_the_exponential():
    generator, seed = fresh_generator()
    v = (torch.rand(100_000, generator=generator) * 176 - 87.3).float()
    v = torch.cat([v, torch.tensor([0.0, 1e-8, -1e-8, 1.0, -1.0, 88.7, -87.3, 100.0, -100.0])])
    want = v.clamp(-87.3, 88.7).double().exp()  # clamped where e**v leaves the normal float32 numbers
    assert ((exp32(v).double() - want).abs() / (want * 2**-23)).max() <= 2, seed


def test_past_dynamos_recompile_limit_new_arguments_run_the_eager_kernel(recwarn):
    """Each eps is a kernel of its own; past torch._dynamo's limit the call runs eager, with the same
    result, and the compiled kernel stays on for the arguments it has."""
    generator, seed = fresh_generator()
    x, mu, log_scale = random_inputs((4096,), (4096,), torch.float32, generator)
    nll = functools.partial(fused_logit_laplace_nll, reduction="mean", kernel="compiled")
    nll(x, mu, log_scale, EPS)  # compiled, if it was not yet
    with torch._dynamo.config.patch(recompile_limit=1):
        got = nll(x, mu, log_scale, 0.0123)
    assert not dvae.nll_kernel._compile_failed
    reference = reference_nll(*(t.detach().double() for t in (x, mu, log_scale)), eps=0.0123).mean()
    assert_float32_close(got.double(), reference, seed)
    assert any("recompile_limit" in str(w.message) for w in recwarn) or dvae.nll_kernel._recompile_limit_warned


def test_a_nan_scale_makes_the_compiled_loss_nan():
    """exp32 gives no NaN for a NaN input, but the nll keeps ln b itself: the non-finite guard still sees it."""
    generator, _ = fresh_generator()
    x, mu, log_scale = random_inputs((4096,), (4096,), torch.float32, generator)  # a kernel the tests above have
    log_scale.data[123] = float("nan")
    assert uses_compiled_kernel(x, mu, log_scale, EPS, min_elements=0)
    assert fused_logit_laplace_nll(x, mu, log_scale, EPS, reduction="mean", kernel="compiled").isnan()


def test_no_clamping_at_the_ends_of_the_pixel_range_or_for_large_locations():
    x = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    mu = torch.tensor([40.0, -40.0, -3.0, 3.0, 1e3, -1e3], dtype=torch.float64)
    log_scale = torch.tensor([-4.4, -4.4, 3.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(logit_laplace_nll(x, mu, log_scale), reference_nll(x, mu, log_scale))
    big = [t.float().repeat(COMPILED_MIN_ELEMENTS // 6 + 1) for t in (x, mu, log_scale)]
    assert uses_compiled_kernel(*big, EPS)
    assert_float32_close(logit_laplace_nll(*big).double(), reference_nll(*(t.double() for t in big)), "fixed inputs")


@pytest.mark.parametrize("kernel", ["eager", "compiled"])
def test_retained_graph_gives_the_same_gradient_twice(kernel):
    """The compiled kernel hands its saved gradient factors on as the gradients of loss.backward():
    writing to a gradient must not change what the retained graph gives next time."""
    x, mu = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4, requires_grad=True)
    log_scale = torch.zeros((), requires_grad=True)
    loss = fused_logit_laplace_nll(x, mu, log_scale, EPS, reduction="mean", kernel=kernel)
    loss.backward(retain_graph=True)
    first = [mu.grad.clone(), log_scale.grad.clone()]
    mu.grad.mul_(7.0)
    mu.grad = log_scale.grad = None
    loss.backward(retain_graph=True)
    torch.testing.assert_close([mu.grad, log_scale.grad], first)
    assert log_scale.grad.shape == log_scale.shape
    torch.testing.assert_close(torch.autograd.grad(loss, mu, retain_graph=True)[0], first[0])
    torch.testing.assert_close(torch.autograd.grad(2 * loss, mu)[0], 2 * first[0])


def test_bad_reduction_or_kernel_is_refused():
    t = torch.rand(4)
    with pytest.raises(ValueError, match="reduction='sum'"):
        logit_laplace_nll(t, t, t, reduction="sum")
    with pytest.raises(ValueError, match="kernel='fast'"):
        fused_logit_laplace_nll(t, t, t, EPS, kernel="fast")


def inputs(shape, per_pixel_scale: bool, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=dtype)
    mu = (torch.randn(shape, generator=g, dtype=dtype) * 3).requires_grad_()
    log_scale = (torch.randn(shape if per_pixel_scale else (), generator=g, dtype=dtype) - 1).requires_grad_()
    return x, mu, log_scale


@pytest.mark.slow
@pytest.mark.parametrize("per_pixel_scale", [True, False], ids=["per-pixel b", "scheduled scalar b"])
def test_the_fused_loss_and_its_gradients_equal_a_float64_reference(per_pixel_scale):
    x, mu, log_scale = inputs((4, 3, 16, 16), per_pixel_scale, seed=int(per_pixel_scale))
    fused = logit_laplace_nll_mean(x, mu, log_scale, 0.1, fused=True)
    assert not dvae.nll_kernel._compile_failed, "the compiled kernel fell back to the eager one"
    grads = torch.autograd.grad(fused, (mu, log_scale))
    x64, mu64, ls64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, mu, log_scale))
    reference = logit_laplace_nll(x64, mu64, ls64, 0.1).mean()
    grads64 = torch.autograd.grad(reference, (mu64, ls64))
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused.double(), reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, grads64):
        assert got.shape == want.shape  # a broadcast (scalar) log_scale gets a reduced gradient
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_the_fused_loss_passes_gradcheck_in_float64():
    x, mu, log_scale = inputs((2, 3, 4, 4), per_pixel_scale=True, dtype=torch.float64, seed=3)
    assert torch.autograd.gradcheck(lambda m, s: logit_laplace_nll_mean(x, m, s, 0.1, fused=True), (mu, log_scale))
