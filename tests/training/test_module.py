"""The LightningModule's fast paths compute the same training loss: compile_loss, channels-last."""


import pytest
import torch

import dvae.nll_kernel
from dvae.training.module import DVAELightning


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
