import math

import pytest
import torch
from omegaconf import OmegaConf

from dvae.losses import logit_laplace_nll
from dvae.model import DEFAULT_LOG_SCALE_FLOOR, DVAE
from dvae.nn.codebook import GumbelCodebook, gumbel_softmax, perplexity
from tests.conftest import compose_config

TINY = dict(n_hid=16, blocks_per_group=1, groups=3, K=64, n_init=16)


def preset(name):
    """model.* of `dvae-train model=NAME`, as Hydra composes it (a preset may set run-level keys too)."""
    return OmegaConf.to_container(compose_config([f"model={name}"]).model)


@pytest.mark.parametrize("name, size", [("tiny", 32), ("small", 32), ("dalle", 64)])
def test_every_preset_has_the_right_shapes(name, size):
    cfg = preset(name)
    cfg.pop("hard")
    model = DVAE(**cfg).eval()
    f = 2 ** (cfg["groups"] - 1)
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        logits = model.logits(x)
        tokens = model.encode(x)
        out = model.decode(tokens)
    assert logits.shape == (1, cfg["K"], size // f, size // f)
    assert tokens.shape == (1, size // f, size // f) and tokens.dtype == torch.int64
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert model.codebook.shape == (cfg["K"], cfg["n_init"])


def test_dalle_preset_is_the_papers_size():
    model = DVAE(**{k: v for k, v in preset("dalle").items() if k != "hard"})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.encoder) == pytest.approx(53.8e6, rel=0.01)
    assert count(model.decoder) == pytest.approx(43.8e6, rel=0.01)
    assert model.downsampling == 8
    assert "encoder.blocks.group_2.block_1.id_path.weight" in model.state_dict()


def test_training_pass_outputs_mu_and_floored_log_scale():
    model = DVAE(**TINY)
    out = model(torch.rand(2, 3, 16, 16), tau=1.0)
    assert out.logits.shape == (2, 64, 4, 4)
    assert out.mu.shape == (2, 3, 16, 16) and out.log_scale.shape == (2, 3, 16, 16)
    assert (out.log_scale >= model.log_scale_floor).all()
    fixed = DVAE(**TINY, learned_scale=False)
    assert fixed(torch.rand(2, 3, 16, 16)).log_scale is None
    assert fixed.decoder.blocks.output.conv.out_channels == 3


def test_log_scale_floor_holds_for_very_negative_raw_outputs():
    model = DVAE(**TINY)
    raw = torch.full((1, 6, 4, 4), -1e4)
    _, log_scale = model.split_output(raw)
    assert torch.allclose(log_scale, torch.full_like(log_scale, model.log_scale_floor))


def test_decode_is_the_decoder_on_one_hot_codes():
    """The fast lookup path equals the 1x1 convolution over a one-hot (the training path)."""
    model = DVAE(**TINY).eval()
    tokens = torch.randint(0, 64, (2, 4, 4))
    one_hot = torch.nn.functional.one_hot(tokens, 64).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        torch.testing.assert_close(model.decoder.forward_tokens(tokens), model.decoder(one_hot),
                                   atol=1e-5, rtol=1e-5)


def test_codebook_is_the_decoder_weight_itself():
    model = DVAE(**TINY).eval()
    tokens = torch.randint(0, 64, (1, 4, 4))
    before = model.decode(tokens)
    with torch.no_grad():
        model.codebook.add_(1.0)
    assert not torch.allclose(before, model.decode(tokens))


@pytest.mark.parametrize("images, match", [
    (torch.rand(3, 16, 16), "rank-3"),
    (torch.rand(1, 1, 16, 16), "3 channels"),
    (torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8), "floating point"),
    (torch.rand(1, 3, 18, 16), "multiples of 4"),
    ("not a tensor", "torch.Tensor"),
    (torch.rand(1, 3, 16, 16) * 255, r"in \[0, 1\].*/ 255"),
    (torch.full((1, 3, 16, 16), float("nan")), "NaN"),
])
def test_wrong_images_are_refused_with_what_to_pass(images, match):
    with pytest.raises(ValueError, match=match):
        DVAE(**TINY).encode(images)


@pytest.mark.parametrize("tokens, match", [
    (torch.zeros(4, 4, dtype=torch.long), r"\[B, h, w\]"),
    (torch.zeros(1, 4, 4), "integers"),
    (torch.full((1, 4, 4), 64), r"\[0, 64\)"),
    (torch.full((1, 4, 4), -1), r"\[0, 64\)"),
    (torch.zeros(1, 0, 4, dtype=torch.long), "at least 1x1"),
])
def test_wrong_tokens_are_refused(tokens, match):
    with pytest.raises(ValueError, match=match):
        DVAE(**TINY).decode(tokens)


def test_encode_takes_any_float_dtype_and_decode_any_integer_dtype():
    model = DVAE(**TINY).eval()
    images = torch.randint(0, 9, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0)) / 8  # exact in half
    with torch.no_grad():
        tokens = model.encode(images)
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            assert torch.equal(model.encode(images.to(dtype)), tokens), dtype
        images_back = model.decode(tokens)
        for dtype in (torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32):
            assert torch.equal(model.decode(tokens.to(dtype)), images_back), dtype


def test_gumbel_softmax_is_a_distribution_and_hard_is_one_hot():
    logits = torch.randn(4, 10, 3, 3, requires_grad=True)
    soft = gumbel_softmax(logits, tau=0.5)
    torch.testing.assert_close(soft.sum(1), torch.ones(4, 3, 3))
    hard = gumbel_softmax(logits, tau=0.5, hard=True)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(hard.sum(1), torch.ones(4, 3, 3))
    hard.mul(torch.randn_like(hard)).sum().backward()
    assert logits.grad.abs().sum() > 0  # straight-through gradient


def test_gumbel_samples_follow_the_categorical():
    """At a low temperature the sample's argmax is distributed as softmax(logits)."""
    torch.manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0]).log_softmax(0).view(1, 3, 1, 1).expand(20000, 3, 1, 1)
    counts = torch.bincount(gumbel_softmax(logits, tau=0.1).argmax(1).flatten(), minlength=3)
    torch.testing.assert_close(counts / 20000, torch.tensor([0.0, 1.0, 2.0]).softmax(0), atol=0.015, rtol=0)


def test_codebook_eval_uses_argmax_and_kl_matches_formula():
    book = GumbelCodebook(K=8).eval()
    logits = torch.randn(2, 8, 3, 3)
    z = book(logits, tau=1.0)
    assert torch.equal(z.argmax(1), logits.argmax(1)) and torch.equal(z.sum(1), torch.ones(2, 3, 3))
    q = logits.softmax(1)
    torch.testing.assert_close(book.kl_to_uniform(logits), (q * (q * 8).log()).sum(1))
    assert book.kl_to_uniform(torch.zeros(1, 8, 1, 1)).abs().max() < 1e-6
    for tau in (0.0, float("nan")):
        with pytest.raises(ValueError, match="tau"):
            book.train()(logits, tau=tau)


def test_perplexity():
    assert perplexity(torch.tensor([5, 5, 5, 5])).item() == pytest.approx(4.0)
    assert perplexity(torch.tensor([7, 0, 0])).item() == pytest.approx(1.0)


def train_on_a_constant_image(log_scale_floor, steps=150):
    """(lowest ln b of each step, loss of each step) of a tiny DVAE trained with AdamW (lr 1e-2, cosine
    decay) on copies of one flat grey image: the decoder can predict every pixel exactly, the case in
    which the logit-Laplace likelihood rewards b -> 0 without bound."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same sums in any environment (and tiny tensors run faster on one thread)
    try:
        return _train_on_a_constant_image(log_scale_floor, steps)
    finally:
        torch.set_num_threads(threads)


def _train_on_a_constant_image(log_scale_floor, steps):
    model = DVAE(n_hid=8, blocks_per_group=1, groups=2, K=16, n_init=8, log_scale_floor=log_scale_floor)
    images = torch.full((4, 3, 8, 8), 0.6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=1e-4)
    lowest, losses = [], []
    for _ in range(steps):
        out = model(images, tau=1.0)
        loss = logit_laplace_nll(images, out.mu, out.log_scale).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
        lowest.append(out.log_scale.min().item())
        losses.append(loss.item())
    return lowest, losses


def test_the_log_scale_floor_holds_where_constant_images_drive_b_to_zero():
    floor = DEFAULT_LOG_SCALE_FLOOR
    lowest, losses = train_on_a_constant_image(floor)
    assert min(lowest) >= floor and all(math.isfinite(loss) for loss in losses)
    assert lowest[0] > floor + 1 and lowest[-1] < floor + 0.5  # pushed from far above down to the floor
    # Not vacuous: with a floor far below, the same training takes ln b past the default floor.
    unfloored, losses = train_on_a_constant_image(-20.0)
    assert unfloored[-1] < floor - 0.15 and all(math.isfinite(loss) for loss in losses)


# --- DVAEConfig: the one description of the network, from the YAML to the export ----------------------------

def test_a_config_object_and_keywords_build_the_same_network():
    from dvae import DVAEConfig

    config = DVAEConfig(**TINY)
    by_object, by_keywords = DVAE(config), DVAE(**TINY)
    assert by_object.config == by_keywords.config == config
    assert {k: v.shape for k, v in by_object.state_dict().items()} == \
        {k: v.shape for k, v in by_keywords.state_dict().items()}
    assert DVAE(config, K=32).config.K == 32  # a field replaced on top of a config


def test_bad_fields_are_refused_with_the_key_named():
    from dvae import DVAEConfig

    with pytest.raises(ValueError, match="model.n_hid=0 must be a positive integer"):
        DVAEConfig(n_hid=0)
    with pytest.raises(ValueError, match="model.K=1 must be at least 2"):
        DVAEConfig(K=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'hidden'"):
        DVAEConfig(hidden=3)


@pytest.mark.parametrize("name", ["tiny", "small", "dalle"])
def test_every_model_key_of_the_yaml_reaches_the_network_unchanged(name):
    """build_module hands the whole `model:` section to DVAEConfig: a new network option is a field of
    DVAEConfig and its key in the YAML, nothing in between."""
    from dvae.training.builders import build_module
    from tests.conftest import compose_config

    cfg = compose_config([f"model={name}"])
    network = build_module(cfg).model.config
    for key, value in cfg.model.items():
        assert getattr(network, key) == value, key
    assert network.channels == cfg.data.channels and network.eps == cfg.pixel_eps


def test_the_module_refuses_an_argument_that_is_not_a_network_field():
    from dvae.training.module import DVAELightning

    with pytest.raises(TypeError, match="unknown arguments hidden_width"):
        DVAELightning(hidden_width=3)


def test_numpy_numbers_become_plain_python_values_in_the_config():
    import numpy as np

    from dvae import DVAEConfig

    config = DVAEConfig(n_hid=np.int64(8), K=np.int32(16), log_scale_floor=np.float32(-20), eps=0, hard=np.bool_(True))
    assert (type(config.n_hid), type(config.K), type(config.log_scale_floor), type(config.eps), type(config.hard)) == \
        (int, int, float, float, bool)
    with pytest.raises(ValueError, match="pixel_eps='a' must be a number"):
        DVAEConfig(eps="a")


def test_the_network_cannot_drift_from_its_config():
    model = DVAE(**TINY)
    with pytest.raises(AttributeError):
        model.eps = 0.2  # an export writes model.config: the network must be what it says
    with pytest.raises(TypeError, match="DVAE takes a DVAEConfig"):
        DVAE(3)
