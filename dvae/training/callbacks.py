"""Callbacks that show people what the run is doing: reconstruction grids and codebook-usage
histograms at every validation, and a warning the moment the codebook collapses."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.utils import make_grid, save_image

from dvae.errors import TrainingError
from dvae.nn.codebook import perplexity
from dvae.training.cores import CoreShare


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

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        counts = getattr(pl_module, "last_val_code_counts", None)
        if trainer.sanity_checking or counts is None or not trainer.is_global_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_usage_histogram(counts, self.out_dir / f"usage_step_{trainer.global_step:06d}.png",
                             f"validation tokens at step {trainer.global_step}")


def save_usage_histogram(counts: torch.Tensor, path: Path, title: str) -> None:
    """How often each code was chosen, codes sorted from most to least used, on a log scale from half a
    token to all of them: a healthy codebook is a long gentle slope, a collapsed one a few bars. Drawn with PIL
    (a few milliseconds; a plotting library would take a second at every validation)."""
    counts = counts.double().cpu()
    K, total, used = counts.numel(), max(float(counts.sum()), 1.0), int((counts > 0).sum())
    share = (counts / total).sort(descending=True).values
    width, height, left, right, top, bottom = 720, 260, 60, 20, 30, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    low = math.log10(0.5 / total)  # half a token's share: a code chosen once still gets a visible bar

    def y_of(value: float) -> float:
        return top + plot_h * (1 - (math.log10(value) - low) / (0 - low)) if low < 0 else top

    for k in range(used):
        x0 = left + plot_w * k / K
        draw.rectangle([x0, y_of(float(share[k])), max(x0, left + plot_w * (k + 1) / K - 1), top + plot_h],
                       fill=(31, 119, 180))
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for power in range(math.floor(low), 1):
        if power >= low:
            y = y_of(10.0 ** power)
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((4, y - 6), f"1e{power}", fill="black")
    for k in (0, K // 2, K):
        x = left + plot_w * k / K
        draw.line([x, top + plot_h, x, top + plot_h + 4], fill="black")
        draw.text((x - 8, top + plot_h + 6), str(k), fill="black")
    draw.text((left, height - 16), "codes, most used first; height: share of tokens (log scale)", fill="black")
    draw.text((left, 8), f"{title}: {used} of {K} codes used, perplexity {float(perplexity(counts)):.1f}",
              fill="black")
    image.save(path)


class CodebookCollapsed(TrainingError):
    """The codebook fell below `codebook.collapse_below` with `codebook.stop_on_collapse=true`."""


class CodebookMonitor(L.Callback):
    """Warns once, in plain words, when the training batches of the usage window use fewer than
    `collapse_below` of the K codes, naming what to try; stops the run there when `stop` is set."""

    def __init__(self, collapse_below: float, stop: bool = False, check_every: int = 10):
        self.collapse_below = collapse_below
        self.stop = stop
        self.check_every = check_every  # reading the counts waits for a GPU: not after every update
        self.warned_at: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        usage = pl_module.usage
        if self.warned_at is not None or not usage.full or trainer.global_step % self.check_every:
            return
        used, K = usage.codes_used(), usage.K
        if used >= self.collapse_below * K:
            return
        self.warned_at = trainer.global_step
        message = (f"the codebook collapsed to {used} of {K} codes at step {trainer.global_step} (perplexity "
                   f"{usage.perplexity():.1f} over the last {usage.size} training batches): the tokens carry "
                   f"little information; {pl_module.collapse_advice()}")
        if self.stop:
            raise CodebookCollapsed(f"{message}; stopped because codebook.stop_on_collapse=true")
        if trainer.is_global_zero:
            print(f"dvae-train: warning: {message}.", file=sys.stderr)


class ShareCores(L.Callback):
    """Torch's threads in each training process (set in the process that trains: under ddp_spawn, each
    spawned rank). `threads=N`: exactly N. `threads=auto`: this process's share of the machine's cores among
    the dvae training processes running there (dvae/training/cores.py), re-counted every `check_every` updates, said
    when it changes. `release` (train() calls it when the run is over, final validation included) gives
    the cores back."""

    def __init__(self, threads: int | str = "auto", check_every: int = 20, share: CoreShare | None = None):
        self.fixed = None if threads == "auto" else int(threads)
        self.check_every = check_every
        self.share = share or CoreShare()

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.fixed is not None:
            torch.set_num_threads(self.fixed)
        elif self.share.register():
            self.share.update()
            self.say(trainer, self.share.threads, self.share.jobs)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.fixed is None and trainer.global_step % self.check_every == 0:
            changed = self.share.update()
            if changed:
                self.say(trainer, *changed)

    def say(self, trainer, threads: int, jobs: int) -> None:
        if trainer.is_global_zero:
            others = f"{jobs} dvae training processes share" if jobs > 1 else "one dvae training process on"
            print(f"dvae-train: {others} this machine's {self.share.cores} cores: {threads} torch "
                  f"thread{'s' if threads > 1 else ''} here (threads=auto)", file=sys.stderr)

    def release(self) -> None:
        self.share.unregister()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.share.unregister()


class TrainingClock(L.Callback):
    """Logs `val/training_seconds` with each validation: seconds since training started, with the time
    from each validation's start to the next training batch left out (validation, and the checkpoints
    and images written after it), so validating often does not change it. A resumed run counts from 0
    again. What scripts/time_to_quality.py reads."""

    def __init__(self):
        self.start = self.paused_since = None
        self.paused_seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start, self.paused_seconds, self.paused_since = time.perf_counter(), 0.0, None

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.start is not None and self.paused_since is None:
            self.paused_since = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.start is None or self.paused_since is None:
            return  # a validation outside fit (trainer.validate after training)
        seconds = self.paused_since - self.start - self.paused_seconds
        pl_module.log("val/training_seconds", float(seconds), prog_bar=False, sync_dist=False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.paused_since is not None:
            self.paused_seconds += time.perf_counter() - self.paused_since
            self.paused_since = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.start = None
