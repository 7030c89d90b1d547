"""The fast paths compute the same function: the compiled (fused) logit-Laplace loss, channels-last training."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dvae.nll_kernel
from dvae.losses import logit_laplace_nll, logit_laplace_nll_mean
from dvae.training.module import DVAELightning


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


@pytest.mark.slow
def test_the_training_loss_is_the_same_with_and_without_compile_loss():
    torch.manual_seed(0)
    eager = DVAELightning(n_hid=8, blocks_per_group=1, groups=2, K=16, n_init=8)
    fused = DVAELightning(n_hid=8, blocks_per_group=1, groups=2, K=16, n_init=8, compile_loss=True)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        out = eager.model(x, 1.0)
    terms = [module.elbo_terms(module.model, x, out.logits, out.mu, out.log_scale)[:2] for module in (eager, fused)]
    torch.testing.assert_close(terms[0][0], terms[1][0], rtol=1e-5, atol=1e-6)
    assert not dvae.nll_kernel._compile_failed, "the compiled kernel fell back to the eager one"


def test_channels_last_training_computes_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = DVAELightning(n_hid=8, blocks_per_group=1, groups=2, K=16, n_init=8)
    fast = DVAELightning(n_hid=8, blocks_per_group=1, groups=2, K=16, n_init=8, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    fast.setup("fit")
    assert fast.model.encoder.blocks.input.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 16, 16)
    results = []
    for module in (plain, fast):
        torch.manual_seed(1)  # the same Gumbel noise
        batch = module.on_after_batch_transfer(x.clone(), 0)
        out = module.model(batch, 1.0)
        rec, kl, _ = module.elbo_terms(module.model, batch, out.logits, out.mu, out.log_scale)
        (rec + kl).backward()
        results.append((rec + kl, [p.grad for p in module.model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    fast.teardown("fit")
    assert fast.ema_model.encoder.blocks.input.weight.is_contiguous()  # loaded and exported models are NCHW


@pytest.mark.parametrize("n_layers", [4, 3], ids=["power-of-two gain", "gain 1/9"])
@pytest.mark.parametrize("n_in", [8, 16], ids=["1x1 identity path", "identity"])
def test_a_residual_block_computes_id_path_plus_post_gain_times_res_path(n_layers, n_in):
    """ResidualBlock folds post_gain into its last convolution; the function (and its gradients) stays
    id_path(x) + post_gain * res_path(x), in float64 to rounding and bit for bit for a power-of-two gain."""
    from dvae.nn.blocks import ResidualBlock

    torch.manual_seed(n_layers)
    for dtype in (torch.float64, torch.float32):
        block = ResidualBlock(n_in, 16, n_layers, (3, 3, 3, 1)).to(dtype)
        with torch.no_grad():
            for bias in (m.bias for m in block.modules() if isinstance(m, torch.nn.Conv2d)):
                bias.normal_()  # they start at zero
        x = torch.randn(2, n_in, 8, 8, dtype=dtype, requires_grad=True)
        got = block(x)
        want = block.id_path(x) + block.post_gain * block.res_path(x)
        weights = torch.randn_like(got)
        grads = [torch.autograd.grad((y * weights).sum(), [x, *block.parameters()]) for y in (got, want)]
        if n_layers == 4:
            assert torch.equal(got, want)
            assert all(torch.equal(g, w) for g, w in zip(*grads))
        else:
            tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
            torch.testing.assert_close(got, want, **tolerance)
            torch.testing.assert_close(grads[0], grads[1], **tolerance)


HUGE_PAGE_FLAG_OF_A_TENSOR = """
import dvae, os, torch
tensor = torch.empty(64 << 20, dtype=torch.uint8)
lines = open("/proc/self/smaps").read().splitlines()
starts = [i for i, line in enumerate(lines) if "-" in line.split(" ")[0] and ":" not in line.split(" ")[0]]
for i, j in zip(starts, starts[1:] + [len(lines)]):
    low, high = (int(a, 16) for a in lines[i].split()[0].split("-"))
    if low <= tensor.data_ptr() < high:
        flags = next(line for line in lines[i:j] if line.startswith("VmFlags:")).split()[1:]
print(os.environ["THP_MEM_ALLOC_ENABLE"], "hg" in flags)
"""


def _run_python(code: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").is_dir(), reason="no transparent huge pages")
def test_importing_dvae_first_asks_for_huge_pages_for_large_cpu_tensors():
    """`import dvae` sets THP_MEM_ALLOC_ENABLE=1: torch then madvises allocations of 2 MB and more for
    transparent huge pages (14x fewer page faults per step), which the kernel shows as the "hg" flag of
    the tensor's mapping. A fresh process: torch reads the variable once."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert _run_python(HUGE_PAGE_FLAG_OF_A_TENSOR, env).split() == ["1", "True"]


def test_a_huge_page_setting_the_user_made_is_kept():
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}
    assert _run_python("import dvae, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])", env).split() == ["0"]


def _nearest_2x(x):
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


@pytest.mark.parametrize("kernels", [(1, 3, 3, 3), (3, 3, 3, 1)], ids=["decoder block", "encoder block"])
@pytest.mark.parametrize("n_in", [32, 16], ids=["1x1 identity path", "identity"])
def test_an_upsampling_block_is_the_block_on_the_upsampled_input(kernels, n_in):
    """A block with upsample=2 runs its per-pixel layers before upsampling; the function and its gradients
    stay block(nearest-upsampled x), in float64 to rounding."""
    from dvae.nn.blocks import ResidualBlock

    torch.manual_seed(0)
    block = ResidualBlock(n_in, 16, 4, kernels, upsample=2).double()
    with torch.no_grad():
        for bias in (m.bias for m in block.modules() if isinstance(m, torch.nn.Conv2d)):
            bias.normal_()
    x = torch.randn(2, n_in, 5, 6, dtype=torch.float64, requires_grad=True)
    got = block(x)
    big = _nearest_2x(x)
    want = block.id_path(big) + block.post_gain * block.res_path(big)
    assert got.shape == (2, 16, 10, 12)
    weights = torch.randn_like(got)
    grads = [torch.autograd.grad((y * weights).sum(), [x, *block.parameters()]) for y in (got, want)]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("blocks_per_group", [1, 2])
def test_the_decoder_upsamples_twice_between_groups(blocks_per_group):
    """The decoder's function written out: groups of blocks with a nearest 2x upsampling between groups."""
    from dvae.nn.decoder import Decoder

    torch.manual_seed(0)
    decoder = Decoder(out_channels=6, n_hid=8, blocks_per_group=blocks_per_group, groups=3, K=16, n_init=8)
    decoder = decoder.double()
    z = torch.softmax(torch.randn(2, 16, 3, 4, dtype=torch.float64), dim=1)
    h = decoder.blocks.input(z)
    for g in (1, 2, 3):
        if g > 1:
            h = _nearest_2x(h)
        for block in getattr(decoder.blocks, f"group_{g}"):
            h = block.id_path(h) + block.post_gain * block.res_path(h)
    want = decoder.blocks.output(h)
    got = decoder(z)
    assert got.shape == (2, 6, 12, 16)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
