"""Keeping the codebook in use: the usage window, the batch-usage term, re-seeding dead codes, the monitor."""

import math

import pytest
import torch

from dvae.nn.codebook import perplexity
from dvae.training.callbacks import CodebookCollapsed, CodebookMonitor, save_usage_histogram
from dvae.training.module import DVAELightning
from dvae.training.usage import (
    UsageWindow,
    batch_usage_deficit,
    choose_reseeds,
    collapse_advice,
    posterior_went_uniform,
    reseed_codes,
    run_verdict,
)


def test_usage_window_counts_only_the_last_batches():
    window = UsageWindow(K=5, size=2)
    window.add(torch.tensor([[0, 0], [1, 1]]))
    window.add(torch.tensor([2, 2]))
    assert window.full and window.codes_used() == 3
    window.add(torch.tensor([4]))  # the first batch leaves the window
    assert window.total.tolist() == [0, 0, 2, 0, 1]
    assert window.codes_used() == 2
    assert window.perplexity() == pytest.approx(float(perplexity(torch.tensor([2, 1]))))
    restored = UsageWindow(K=5, size=2)
    restored.load_state_dict(window.state_dict())
    restored.add(torch.tensor([3]))
    assert restored.total.tolist() == [0, 0, 0, 1, 1]


def test_batch_usage_deficit_is_zero_for_a_uniform_batch_and_log_k_for_one_code():
    K = 8
    uniform = torch.zeros(2, K, 3, 3)
    assert float(batch_usage_deficit(uniform)) == pytest.approx(0.0, abs=1e-6)
    one_code = torch.full((2, K, 3, 3), -50.0)
    one_code[:, 3] = 50.0
    assert float(batch_usage_deficit(one_code)) == pytest.approx(math.log(K), abs=1e-5)
    # confident, but on different codes at different positions: the batch as a whole uses them all
    spread = torch.full((1, K, 1, K), -50.0)
    spread[0, torch.arange(K), 0, torch.arange(K)] = 50.0
    assert float(batch_usage_deficit(spread)) == pytest.approx(0.0, abs=1e-5)


def test_a_step_down_the_usage_gradient_raises_the_entropy_of_the_batch_averaged_posterior():
    torch.manual_seed(0)
    logits = torch.randn(4, 16, 5, 5)
    logits[:, 2] += 3.0  # most positions favour code 2
    logits.requires_grad_(True)
    deficit = batch_usage_deficit(logits)
    deficit.backward()

    def entropy(l):
        q = l.softmax(dim=1).mean(dim=(0, 2, 3))
        return float(-(q * q.log()).sum())
    stepped = (logits - 0.5 * logits.grad / logits.grad.norm()).detach()
    assert entropy(stepped) > entropy(logits.detach()) + 1e-3
    # the favoured code's logits are pushed down at every position
    assert bool((logits.grad[:, 2] > 0).all())


def test_choose_reseeds_pairs_every_dead_code_with_a_used_one():
    counts = torch.tensor([0, 10, 0, 0, 1])
    dead, sources = choose_reseeds(counts, torch.Generator().manual_seed(0))
    assert dead.tolist() == [0, 2, 3]
    assert set(sources.tolist()) <= {1, 4}
    assert choose_reseeds(torch.tensor([1, 2]), torch.Generator())[0].numel() == 0


def test_reseeding_touches_only_dead_codes_and_copies_the_source():
    torch.manual_seed(0)
    encoder_out, codebook = torch.nn.Conv2d(6, 5, 1), torch.nn.Conv2d(5, 4, 1)
    before = [t.detach().clone() for t in (encoder_out.weight, encoder_out.bias, codebook.weight)]
    dead, sources = torch.tensor([0, 3]), torch.tensor([1, 1])
    reseed_codes(encoder_out, codebook, dead, sources, torch.Generator().manual_seed(0), noise=0.01)
    weight, bias, codes = encoder_out.weight, encoder_out.bias, codebook.weight
    alive = [1, 2, 4]
    assert torch.equal(weight[alive], before[0][alive]) and torch.equal(bias[alive], before[1][alive])
    assert torch.equal(codes[:, alive], before[2][:, alive])
    for d in (0, 3):  # a near copy of code 1, not an exact one (the copies must be able to part)
        for new, old, dim in ((weight, before[0], 0), (codes, before[2], 1)):
            new_row, source_row = new.select(dim, d), old.select(dim, 1)
            assert not torch.equal(new_row, source_row)
            assert torch.allclose(new_row, source_row, atol=0.05 * float(old.std()))
        assert not torch.equal(new_row, before[2].select(1, d))


def small_module(**kwargs):
    return DVAELightning(n_hid=8, blocks_per_group=1, groups=2, K=16, n_init=8, **kwargs)


def test_the_usage_term_enters_the_loss_only_when_weighted():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    plain = small_module()
    weighted = small_module(usage_weight=2.0)
    weighted.load_state_dict(plain.state_dict())
    for module in (plain, weighted):
        module.optimizers = lambda: type("O", (), {"param_groups": [{"lr": 0.0}]})()
        module.log_dict = module.log = lambda *a, **k: None
    torch.manual_seed(1)
    loss_plain = plain.training_step(x, 0)
    torch.manual_seed(1)
    loss_weighted = weighted.training_step(x, 0)
    logits = weighted.model.logits(x)
    expected = 2.0 * batch_usage_deficit(logits) * logits[0, 0].numel() / x[0].numel()
    assert float((loss_weighted - loss_plain).detach()) == pytest.approx(float(expected.detach()), rel=1e-4)
    assert plain.usage.batches == weighted.usage.batches == 1


def position_entropy(logits):
    """sum over positions of H(q_i), per sub-pixel of an 8x8 RGB image, averaged over the batch."""
    log_q = logits.log_softmax(dim=1)
    return -(log_q.exp() * log_q).sum(dim=1).sum(dim=(1, 2)).mean() / (3 * 8 * 8)


def test_the_entropy_term_enters_only_when_weighted_and_sharpens_the_posterior():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    plain, weighted = small_module(), small_module(entropy_weight=0.5)
    weighted.load_state_dict(plain.state_dict())
    for module in (plain, weighted):
        module.optimizers = lambda: type("O", (), {"param_groups": [{"lr": 0.0}]})()
        module.log = lambda *a, **k: None
    torch.manual_seed(1)
    loss_plain = plain.training_step(x, 0)
    torch.manual_seed(1)
    loss_weighted = weighted.training_step(x, 0)
    before = position_entropy(weighted.model.logits(x)).detach()
    assert float((loss_weighted - loss_plain).detach()) == pytest.approx(0.5 * float(before), rel=1e-4)
    # the term's own gradient, one step down on the encoder's output layer, makes the positions less uncertain
    weighted.step_metrics["train/entropy"].backward()
    with torch.no_grad():
        conv = weighted.model.encoder.blocks.output.conv
        for p in (conv.weight, conv.bias):
            p -= 100.0 * p.grad
        after = position_entropy(weighted.model.logits(x))
    assert float(after) < float(before) - 1e-4


class FakeTrainer:
    global_step = 600
    is_global_zero = True


def test_the_monitor_warns_once_on_a_collapsed_window_and_not_on_a_healthy_one(capsys):
    module = small_module(usage_window=2)
    monitor = CodebookMonitor(collapse_below=0.25)
    module.usage.add(torch.arange(16))
    module.usage.add(torch.arange(16))
    monitor.on_train_batch_end(FakeTrainer(), module, None, None, 0)
    assert capsys.readouterr().err == ""
    for _ in range(2):
        module.usage.add(torch.tensor([3, 3, 5]))
    monitor.on_train_batch_end(FakeTrainer(), module, None, None, 0)
    monitor.on_train_batch_end(FakeTrainer(), module, None, None, 0)
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "collapsed to 2 of 16 codes at step 600" in err and "codebook.usage_weight" in err
    stopping = CodebookMonitor(collapse_below=0.25, stop=True)
    with pytest.raises(CodebookCollapsed, match="stop_on_collapse"):
        stopping.on_train_batch_end(FakeTrainer(), module, None, None, 0)


def test_usage_histogram_is_a_png(tmp_path):
    path = tmp_path / "usage.png"
    save_usage_histogram(torch.tensor([5, 0, 1, 9]), path, "validation tokens")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    with Image.open(path) as image:
        # the third-most-used code, chosen once, has a bar above the axis (x in the third quarter of the plot)
        column = [image.getpixel((60 + 640 * 5 // 8, y)) for y in range(30, 219)]
    assert (31, 119, 180) in column


def test_module_reseeding_moves_model_ema_and_optimizer_moments_together():
    torch.manual_seed(0)
    module = small_module(reseed_every=1, usage_window=1)
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    module.model(torch.rand(2, 3, 8, 8), 1.0).mu.sum().backward()
    optimizer.step()
    module.optimizers = lambda: optimizer
    module.usage.add(torch.tensor([1, 1, 2]))
    out, codes = module.model.encoder.blocks.output.conv, module.model.decoder.blocks.input
    ema_out = module.ema_model.encoder.blocks.output.conv
    before = {name: t.detach().clone() for name, t in
              (("w", out.weight), ("b", out.bias), ("c", codes.weight), ("ema", ema_out.weight),
               ("m", optimizer.state[out.weight]["exp_avg"]))}
    assert module.reseed_dead_codes(step=5) == 14
    dead = [k for k in range(16) if k not in (1, 2)]
    for alive in (1, 2):
        assert torch.equal(out.weight[alive], before["w"][alive])
        assert torch.equal(ema_out.weight[alive], before["ema"][alive])
        assert torch.equal(optimizer.state[out.weight]["exp_avg"][alive], before["m"][alive])
    for k in dead:
        assert not torch.equal(out.weight[k], before["w"][k])
        assert torch.equal(ema_out.weight[k], out.weight[k])  # the validated copy is the new code at once
        moment = optimizer.state[out.weight]["exp_avg"][k]
        assert torch.equal(moment, before["m"][1]) or torch.equal(moment, before["m"][2])
        nearest = min((1, 2), key=lambda s: float((out.weight[k].detach() - before["w"][s]).norm()))
        assert torch.equal(moment, before["m"][nearest])  # the moments of the code it copied


def race(usage_weight: float, updates: int = 20) -> int:
    """The collapse in a second: the reconstruction (KL weight 0, as at the start of a run) on one batch of
    smooth colour fields, AdamW at the default learning rate; how many codes the batch's argmax uses."""
    torch.manual_seed(0)
    fields = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    x = torch.nn.functional.interpolate(fields, size=16, mode="bilinear", align_corners=False)
    module = DVAELightning(n_hid=16, blocks_per_group=1, groups=3, K=64, n_init=16, usage_weight=usage_weight)
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-2)
    for _ in range(updates):
        out = module.model(x, 1.0)
        rec, _, _ = module.elbo_terms(module.model, x, out.logits, out.mu, out.log_scale)
        loss = rec + usage_weight * batch_usage_deficit(out.logits) * out.logits[0, 0].numel() / x[0].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return len(module.model.logits(x).argmax(dim=1).unique())


def test_the_early_race_puts_every_position_on_a_few_codes_unless_the_usage_term_is_on():
    assert race(usage_weight=0.0) <= 4
    assert race(usage_weight=3.0) >= 6


def test_the_verdict_needs_a_gain_and_a_used_codebook():
    healthy, sentence = run_verdict(4.5, 0.3, 512, 0.05)
    assert healthy and sentence == ("the run is healthy: +4.50 dB over the mean-colour baseline, 154 of 512 codes "
                                    "used on the validation set.")
    assert not run_verdict(-4.7, 1 / 512, 512, 0.05)[0]  # the collapse the issue reported
    assert not run_verdict(2.0, 0.01, 512, 0.05)[0]
    assert "NOT healthy" in run_verdict(-0.1, 0.5, 512, 0.05)[1]
    advice = collapse_advice(20.0, hard=False)
    assert "codebook.usage_weight=60 (now 20)" in run_verdict(-4.7, 1 / 512, 512, 0.05, advice)[1]


@pytest.mark.parametrize("kl_per_position, cure", [(1e-4, "entropy_weight=1"), (2.0, "usage_weight=60 (now 20)")])
def test_the_advice_tells_a_uniform_collapse_from_a_one_hot_one(capsys, kl_per_position, cure):
    # a uniform posterior satisfies the usage term, so more usage weight is the wrong cure there (docs/collapse.md)
    module = small_module(usage_window=1, usage_weight=20.0)
    module.usage.add(torch.tensor([3, 3, 3]))
    module.last_kl_per_position = torch.tensor(kl_per_position)
    CodebookMonitor(collapse_below=0.25).on_train_batch_end(FakeTrainer(), module, None, None, 0)
    err = capsys.readouterr().err
    assert cure in err and ("went uniform" in err) == (kl_per_position < 1)
    assert posterior_went_uniform(kl_per_position, 16) == (kl_per_position < 1)
    assert not posterior_went_uniform(None, 16)


def test_a_collapse_under_straight_through_sampling_names_model_hard(capsys):
    # measured (docs/collapse.md): model.hard=true lets the posterior go uniform; more usage weight does not help
    module = small_module(usage_window=1, hard=True)
    module.usage.add(torch.tensor([3, 3, 3]))
    CodebookMonitor(collapse_below=0.25).on_train_batch_end(FakeTrainer(), module, None, None, 0)
    err = capsys.readouterr().err
    assert "model.hard=false" in err and "usage_weight" not in err


def test_the_paper_experiment_keeps_the_papers_objective():
    from tests.conftest import compose_config

    cfg = compose_config(["experiment=paper", "data.root=/tmp"])
    assert cfg.codebook.usage_weight == 0 and cfg.codebook.reseed_every == 0 and cfg.codebook.entropy_weight == 0
    assert cfg.scale.mode == "learned" and cfg.loss == "logit_laplace"  # the decoder predicts ln b, as in the paper
