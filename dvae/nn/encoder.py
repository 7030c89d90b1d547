"""The DALL·E encoder: images -> K logits per latent position (downsampling 2**(groups-1))."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from dvae.nn.blocks import ResidualBlock, conv, group_widths


class Encoder(nn.Module):
    """7x7 input conv; `groups` groups of residual blocks, 2x2 max-pool after all but the last;
    ReLU then a 1x1 conv to `K` logits. Module names (`blocks.group_1.block_1...`) follow the
    official model so its weights map one to one."""

    def __init__(self, channels: int = 3, n_hid: int = 256, blocks_per_group: int = 2,
                 groups: int = 4, K: int = 8192):
        super().__init__()
        n_layers = groups * blocks_per_group
        widths = group_widths(n_hid, groups)
        stages: dict[str, nn.Module] = {"input": conv(channels, n_hid, 7)}
        n_in = n_hid
        for g, width in enumerate(widths, start=1):
            group: dict[str, nn.Module] = {}
            for b in range(1, blocks_per_group + 1):
                group[f"block_{b}"] = ResidualBlock(n_in, width, n_layers, (3, 3, 3, 1))
                n_in = width
            if g < groups:
                group["pool"] = nn.MaxPool2d(kernel_size=2)
            stages[f"group_{g}"] = nn.Sequential(OrderedDict(group))
        stages["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=conv(n_in, K, 1)))
        self.blocks = nn.Sequential(OrderedDict(stages))

    def forward(self, y: Tensor) -> Tensor:
        """Mapped pixels [B, C, H, W] -> logits [B, K, H/f, W/f]."""
        return self.blocks(y)
