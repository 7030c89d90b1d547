"""The fused Gumbel-softmax codebook projection and KL compute the same function as the straightforward
versions, and a training pass keeps one code-sized tensor."""

import copy

import pytest
import torch

from dvae.losses import logit_laplace_nll
from dvae.model import DVAE
from dvae.nn.codebook import GumbelCodebook, GumbelSoftmaxProjection, KLToUniform
from tests.test_nll_kernel import assert_float32_close, fresh_generator


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
