"""The fused kernels compute the same function as the straightforward formulas: values and gradients
on fresh random inputs against float64 references (torch.distributions, autograd, gradcheck)."""

import copy
import functools
import math
import random

import pytest
import torch

import dvae.nll_kernel
from dvae.losses import logit_laplace_nll
from dvae.model import DVAE
from dvae.nll_kernel import COMPILED_MIN_ELEMENTS, exp32, fused_logit_laplace_nll, log32, uses_compiled_kernel
from dvae.nn.codebook import GumbelCodebook, GumbelSoftmaxProjection, KLToUniform

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


def projection(logits, conv, tau, hard, fused, seed):
    """conv(Gumbel-softmax sample), fused or straightforward, with the noise of `seed`."""
    book = GumbelCodebook(logits.shape[1], hard=hard, fused=fused)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return book.project(logits, tau, conv)


def conv_and_logits(dtype, generator, K=16, D=5):
    conv = torch.nn.Conv2d(K, D, 1).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator, dtype=dtype))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator, dtype=dtype))
    logits = (torch.randn(3, K, 4, 5, generator=generator, dtype=dtype) * 2).requires_grad_()
    return conv, logits


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_gumbel_projection_equals_the_straightforward_version(hard, dtype):
    generator, seed = fresh_generator()
    conv, logits = conv_and_logits(dtype, generator)
    grad_out = torch.randn(3, 5, 4, 5, generator=generator, dtype=dtype)
    results = []
    for fused in (True, False):
        out = projection(logits, conv, 0.7, hard, fused, seed=len(seed))
        grads = torch.autograd.grad(out, (logits, conv.weight, conv.bias), grad_out)
        results.append((out, *grads))
    for got, want in zip(*results):
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, msg=lambda m: f"{m}\n({seed})")
        else:
            assert_float32_close(got.double(), want.double(), seed)


def test_fused_gumbel_projection_passes_gradcheck():
    generator, _ = fresh_generator()
    conv, logits = conv_and_logits(torch.float64, generator, K=6, D=3)
    weight, bias = (conv.weight.detach().requires_grad_(), conv.bias.detach().requires_grad_())

    def sample_then_project(logits, weight, bias):
        torch.manual_seed(0)  # the same noise at every evaluation
        return GumbelSoftmaxProjection.apply(logits, weight, bias, 0.5, False)

    assert torch.autograd.gradcheck(sample_then_project, (logits[:1, :, :2, :2], weight, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sample_is_the_softmax_of_logits_plus_gumbel_noise_over_tau(dtype):
    """The in-place sampler computes softmax((logits + g) / tau), g = -log(-log(u)), bit for bit."""
    from dvae.nn.codebook import _relaxed_sample

    generator, seed = fresh_generator()
    logits = torch.randn(2, 64, 3, 4, generator=generator).to(dtype) * 3
    with torch.random.fork_rng():
        torch.manual_seed(len(seed))
        got = _relaxed_sample(logits, 0.7)
        torch.manual_seed(len(seed))
        u = torch.rand(logits.shape, dtype=dtype).clamp(torch.finfo(dtype).tiny, 1.0)
    want = ((logits + -torch.log(-torch.log(u))) / 0.7).softmax(dim=1)
    assert torch.equal(got, want), seed


def test_fused_kl_to_uniform_matches_the_categorical_kl_in_float64():
    generator, seed = fresh_generator()
    logits = (torch.randn(2, 7, 3, 4, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    got = GumbelCodebook(7, fused=True).kl_to_uniform(logits)
    q = torch.distributions.Categorical(logits=logits.movedim(1, -1))
    uniform = torch.distributions.Categorical(logits=torch.zeros(7, dtype=torch.float64))
    want = torch.distributions.kl_divergence(q, uniform)
    weights = torch.rand(got.shape, generator=generator, dtype=torch.float64)
    got_grad, = torch.autograd.grad((got * weights).sum(), logits)
    want_grad, = torch.autograd.grad((want * weights).sum(), logits)
    torch.testing.assert_close(got, want, msg=lambda m: f"{m}\n({seed})")
    torch.testing.assert_close(got_grad, want_grad, msg=lambda m: f"{m}\n({seed})")
    assert torch.autograd.gradcheck(KLToUniform.apply, (logits.detach()[:1, :, :2, :2].requires_grad_(),))


def code_sized_saved_tensors(model, images):
    """The distinct [B, K, h, w] float tensors autograd keeps for the backward of a training loss."""
    shape = None
    kept = {}

    def pack(t):
        if shape is not None and t.shape == shape and t.is_floating_point():
            kept[t.untyped_storage().data_ptr()] = t.shape
        return t

    shape = model.logits(images).shape
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = training_loss(model, images)
    loss.backward()
    return len(kept)


def training_loss(model, images):
    out = model(images, tau=0.5)
    return logit_laplace_nll(images, out.mu, out.log_scale).mean() + model.quantizer.kl_to_uniform(out.logits).mean()


def small_model_and_images(hard: bool):
    generator, seed = fresh_generator()
    images = torch.rand(2, 3, 8, 8, generator=generator)
    return DVAE(n_hid=8, blocks_per_group=1, groups=2, K=64, n_init=8, hard=hard), images, seed


def seeded_backward(model, images, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss and its gradients with the generator seeded; the loss and the generator's next draw."""
    model.zero_grad()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        loss = training_loss(model, images)
        loss.backward()
        return loss, torch.rand(1)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_a_fused_training_pass_keeps_one_code_sized_tensor_and_computes_the_same(hard):
    fused, images, seed = small_model_and_images(hard)
    fused.quantizer.keep_sample_bytes = 0  # what a large codebook gets: the noise is drawn again in backward
    plain = copy.deepcopy(fused)
    plain.quantizer.fused = False
    assert code_sized_saved_tensors(fused, images) == 1
    assert code_sized_saved_tensors(plain, images) >= 3
    for model in (fused, plain):
        seeded_backward(model, images, len(seed))
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert_float32_close(p.grad.double(), q.grad.double(), f"{name}, {seed}")


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_a_kept_sample_gives_the_gradients_of_the_noise_drawn_again(hard):
    """Small samples are kept for backward instead of drawn again (a speed-up): bit for bit the same output
    and gradients, one more code-sized tensor kept."""
    kept, images, seed = small_model_and_images(hard)
    drawn = copy.deepcopy(kept)
    drawn.quantizer.keep_sample_bytes = 0
    assert code_sized_saved_tensors(kept, images) == 2
    results = []
    for model in (kept, drawn):
        loss, after = seeded_backward(model, images, len(seed))  # after: the generator's next draw, the same
        results.append([loss, after, *(p.grad for p in model.parameters())])
    for got, want in zip(*results):
        assert torch.equal(got, want), seed
