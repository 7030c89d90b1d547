"""Callbacks that show people what the run is doing: reconstruction grids at every validation."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image


class ReconstructionGrid(L.Callback):
    """Writes `images/val_step_NNNNNN.png` in the run directory: originals (top row) above the
    EMA model's reconstructions from argmax tokens (bottom row), for the same validation images
    every time. Also sends the grid to TensorBoard or wandb when one of them is the logger."""

    def __init__(self, out_dir: str | Path, n_images: int = 8, min_tile: int = 96):
        self.out_dir = Path(out_dir)
        self.n_images = n_images
        self.min_tile = min_tile  # small crops are enlarged (nearest) so that people can see them
        self.images: torch.Tensor | None = None
        self.last_path: Path | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.images = batch[: self.n_images].detach()

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or self.images is None or not trainer.is_global_zero:
            return
        model = pl_module.ema_model
        x = self.images
        x_hat = model.decode(model.encode(x))
        tiles = torch.cat([x, x_hat]).float().cpu()
        if tiles.shape[-1] < self.min_tile:
            tiles = F.interpolate(tiles, scale_factor=-(-self.min_tile // tiles.shape[-1]), mode="nearest")
        grid = make_grid(tiles, nrow=x.shape[0], padding=2, pad_value=1.0)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.last_path = self.out_dir / f"val_step_{trainer.global_step:06d}.png"
        save_image(grid, self.last_path)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image("val/reconstructions", grid, trainer.global_step)
            elif type(logger).__name__ == "WandbLogger":
                logger.log_image("val/reconstructions", [grid], step=trainer.global_step)
