"""Shared pieces of the DALL·E residual architecture (official `dall_e` package, paper-facts.md)."""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import Tensor, nn
from torch.nn import functional as F


def conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    """A 'same'-padded convolution initialised like the official code: N(0, 1/fan_in), zero bias."""
    layer = nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)
    nn.init.normal_(layer.weight, std=1.0 / math.sqrt(n_in * kernel**2))
    nn.init.zeros_(layer.bias)
    return layer


class ResidualBlock(nn.Module):
    """identity path (1x1 conv when widths differ) + post_gain * four (ReLU, conv) pairs.

    The bottleneck is n_out / 4 wide. `kernels` is (3, 3, 3, 1) in the encoder and (1, 3, 3, 3) in
    the decoder; post_gain = 1 / n_layers**2 keeps the deep residual sum stable at init. With
    `upsample` = f the block reads its input nearest-upsampled by a factor f (the decoder's first block
    of each group after the first).
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int], upsample: int = 1):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"a residual block's width must be divisible by 4, got {n_out}.")
        n_hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.upsample = upsample
        self.id_path = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, n_hid, n_hid, n_hid, n_out)
        layers: dict[str, nn.Module] = {}
        for i, k in enumerate(kernels, start=1):
            layers[f"relu_{i}"] = nn.ReLU()
            layers[f"conv_{i}"] = conv(widths[i - 1], widths[i], k)
        self.res_path = nn.Sequential(OrderedDict(layers))

    def extra_repr(self) -> str:
        return f"upsample={self.upsample}" if self.upsample > 1 else ""

    def _upsampled(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=self.upsample, mode="nearest") if self.upsample > 1 else x

    def forward(self, x: Tensor) -> Tensor:
        # ReLUs and 1x1 convolutions act on each pixel alone, so they commute with nearest upsampling:
        # they run on the small input and the (narrower) result is upsampled. In the decoder that is
        # the identity path and relu_1, conv_1 (1x1) and relu_2 of each group's first block, at a quarter
        # of the pixels (docs/benchmarks.md).
        *head, last = self.res_path
        h, upsampled = x, self.upsample == 1
        for layer in head:
            if not upsampled and not _acts_per_pixel(layer):
                h, upsampled = self._upsampled(h), True
            h = layer(h)
        if not upsampled:
            h = self._upsampled(h)
        # post_gain * conv_4(h) as a convolution with scaled weights: one pass over the block's output
        # fewer, forward and backward; exact when post_gain is a power of two (1, 2, 4, 8, ... layers)
        res = F.conv2d(h, last.weight * self.post_gain, last.bias * self.post_gain, last.stride, last.padding)
        return self._upsampled(self.id_path(x)) + res


def _acts_per_pixel(layer: nn.Module) -> bool:
    """Whether each output pixel depends only on the same input pixel (a ReLU, a 1x1 stride-1 convolution)."""
    if isinstance(layer, nn.ReLU):
        return True
    return isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.stride == (1, 1) \
        and layer.padding == (0, 0) and layer.dilation == (1, 1)


def group_widths(n_hid: int, groups: int) -> list[int]:
    """Widths of the encoder's groups: n_hid x (1, 2, 4, 8) for the paper's 4 groups."""
    return [n_hid * 2**i for i in range(groups)]
