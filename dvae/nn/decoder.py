"""The DALL·E decoder: a (relaxed) one-hot over K codes -> per-pixel logit-Laplace parameters."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dvae.nn.blocks import ResidualBlock, conv, group_widths


class Decoder(nn.Module):
    """1x1 conv K -> n_init (its weight is the codebook); groups of residual blocks with widths
    n_hid x (8, 4, 2, 1), nearest 2x upsampling between groups (done by the next group's first block,
    after its per-pixel layers); ReLU then a 1x1 conv to `out_channels` maps (2*C for a learned scale:
    mu and ln b; C otherwise)."""

    def __init__(self, out_channels: int = 6, n_hid: int = 256, blocks_per_group: int = 2,
                 groups: int = 4, K: int = 8192, n_init: int = 128):
        super().__init__()
        n_layers = groups * blocks_per_group
        widths = group_widths(n_hid, groups)[::-1]
        codebook = conv(K, n_init, 1)
        # Code vectors start at unit scale, not the 1/sqrt(K) of a K-wide convolution: the decoder
        # reads one-hot codes, and with tiny vectors every code looks alike to it at first.
        nn.init.normal_(codebook.weight, std=1.0)
        stages: dict[str, nn.Module] = {"input": codebook}
        n_in = n_init
        for g, width in enumerate(widths, start=1):
            group: dict[str, nn.Module] = {}
            for b in range(1, blocks_per_group + 1):
                upsample = 2 if g > 1 and b == 1 else 1
                group[f"block_{b}"] = ResidualBlock(n_in, width, n_layers, (1, 3, 3, 3), upsample)
                n_in = width
            stages[f"group_{g}"] = nn.Sequential(OrderedDict(group))
        stages["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=conv(n_in, out_channels, 1)))
        self.blocks = nn.Sequential(OrderedDict(stages))

    @property
    def codebook(self) -> Tensor:
        """The K code vectors, [K, n_init]: the input projection's weight (not a copy)."""
        return rearrange(self.blocks.input.weight, "d k 1 1 -> k d")

    def forward(self, z: Tensor) -> Tensor:
        """Relaxed one-hot [B, K, h, w] -> decoder output [B, out_channels, h*f, w*f]."""
        return self.blocks(z)

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        """Hard tokens [B, h, w] -> output; a lookup instead of a K-wide one-hot convolution."""
        embedded = F.embedding(tokens, self.codebook) + self.blocks.input.bias  # (B, h, w, D)
        return self.forward_embedded(rearrange(embedded, "b h w d -> b d h w"))

    def forward_embedded(self, embedded: Tensor) -> Tensor:
        """Code vectors [B, n_init, h, w] (the input convolution's output) -> decoder output."""
        return self.blocks[1:](embedded)
