"""Validation metrics beyond PSNR and SSIM: PSNR near strong edges, and how often each code is used."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

# `val/psnr_edges` counts the pixels whose Sobel gradient magnitude (of the original's luminance,
# in intensity per pixel) is at least this: a step of 10% of the range across one pixel.
EDGE_THRESHOLD = 0.1


def sobel_magnitude(x: Tensor) -> Tensor:
    """[B, C, H, W] images in [0, 1] -> [B, 1, H, W] gradient magnitude of their channel mean."""
    gray = x.mean(dim=1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype) / 8
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)
    grad = torch.nn.functional.conv2d(torch.nn.functional.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return grad.pow(2).sum(dim=1, keepdim=True).sqrt()


class EdgePSNR(Metric):
    """PSNR (dB) pooled over the pixels near strong edges of the originals, over the whole set.

    A pixel counts (all its channels) when the Sobel magnitude of the original is >= threshold;
    the squared error and the count are summed over batches (and ranks), NaN when no pixel counts.
    """

    def __init__(self, threshold: float = EDGE_THRESHOLD):
        super().__init__()
        self.threshold = threshold
        self.add_state("sse", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        mask = (sobel_magnitude(x) >= self.threshold).expand_as(x)
        self.sse += (x - x_hat).pow(2)[mask].sum().double()
        self.count += mask.sum()

    def compute(self) -> Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"))
        mse = (self.sse / self.count).clamp_min(1e-10)
        return (10.0 * torch.log10(1.0 / mse)).float()


class CodeCounts(Metric):
    """How often each of the K codes is the argmax over the validation set (summed over ranks)."""

    def __init__(self, K: int):
        super().__init__()
        self.add_state("counts", default=torch.zeros(K, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, tokens: Tensor) -> None:
        self.counts += torch.bincount(tokens.flatten(), minlength=self.counts.numel())

    def compute(self) -> Tensor:
        return self.counts
