"""The residual blocks and the decoder: post_gain folded into the last convolution, and the per-pixel layers
run before the upsampling, compute the same function."""


import pytest
import torch


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
