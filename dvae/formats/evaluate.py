"""Evaluating exported tokenizers on a set of images, as the field compares them: reconstruction quality
from argmax tokens (PSNR, SSIM), bits/dim, and how the codebook is used. Batch by batch, so memory does
not grow with the number of images; several models see the same images and the same crops."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from dvae.data.images import open_images, save_png
from dvae.errors import ConfigError
from dvae.files import atomic_write
from dvae.formats.devices import progress_bar, resolve_device
from dvae.formats.encode import image_size_for
from dvae.losses import logit_laplace_nll_mean, nll_to_bits_per_dim, psnr, reconstruct, ssim
from dvae.model import DVAE
from dvae.nn.codebook import perplexity
from dvae.pretrained import check_out_dir, read_config

TOP = 10  # the share of tokens the TOP most frequent codes take
GRID_IMAGES = 8  # originals and reconstructions drawn in eval_grid.png
ATLAS_CODES = 1024  # codes drawn in eval_atlas.png (all of them for K <= 1024)
COLUMNS = {"psnr": ("PSNR", "{:.2f}"), "ssim": ("SSIM", "{:.4f}"), "bits_per_dim": ("bits/dim", "{:.3f}"),
           "codes_used": ("codes used", "{:d}"), "codes_used_fraction": ("of K", "{:.1%}"),
           "perplexity": ("perplexity", "{:.1f}"), "top10_share": (f"top-{TOP} share", "{:.1%}"),
           "tokens_per_second": ("tokens/s", "{:,.0f}")}


def usage_figures(counts: Tensor, top: int = TOP) -> dict[str, Any]:
    """How a set of tokens uses a codebook of K = len(counts) codes: codes used (and as a fraction of K), the
    perplexity of the code frequencies, and the share of all tokens taken by the `top` most frequent codes."""
    counts = counts.to(torch.long)
    total = int(counts.sum())
    used = int((counts > 0).sum())
    return {"codes_used": used, "codes_used_fraction": used / counts.numel(),
            "perplexity": float(perplexity(counts)) if total else float("nan"),
            "top10_share": float(counts.sort(descending=True).values[:top].sum()) / total if total else float("nan")}


class Tally:
    """One model's running sums over the images seen so far."""

    def __init__(self, model: DVAE, config: dict[str, Any]):
        self.model, self.config = model, config
        self.with_bits = config.get("loss", "logit_laplace") == "logit_laplace" and model.learned_scale
        self.images = 0
        self.psnr = self.ssim = self.bits = self.seconds = 0.0
        self.counts = torch.zeros(model.K, dtype=torch.long)
        self.first: Tensor | None = None  # the first batch's reconstructions, for the grid

    @torch.inference_mode()
    def add(self, x: Tensor) -> None:
        """The validation step's measures (argmax tokens, no noise) on a batch."""
        model = self.model
        start = time.perf_counter()
        logits = model.logits(x)
        tokens = logits.argmax(dim=1)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        self.seconds += time.perf_counter() - start
        mu, log_scale = model.split_output(model.decoder.forward_tokens(tokens))
        x_hat = reconstruct(mu, model.eps)
        self.psnr += float(psnr(x, x_hat).sum())
        self.ssim += float(ssim(x, x_hat).sum())
        if self.with_bits:
            rec = logit_laplace_nll_mean(x, mu, log_scale, model.eps)
            kl = model.kl_per_subpixel(logits, x)
            self.bits += float(nll_to_bits_per_dim(rec + kl, model.eps)) * len(x)
        self.counts += torch.bincount(tokens.flatten().cpu(), minlength=model.K)
        self.images += len(x)
        if self.first is None:
            self.first = x_hat[:GRID_IMAGES].cpu()

    def result(self) -> dict[str, Any]:
        n = max(self.images, 1)
        tokens = int(self.counts.sum())
        return {"psnr": self.psnr / n, "ssim": self.ssim / n,
                "bits_per_dim": self.bits / n if self.with_bits else None,
                **usage_figures(self.counts), "tokens_per_second": tokens / self.seconds if self.seconds else None}


def _check_models(model_dirs: list[Path], size: int | None) -> tuple[list[dict[str, Any]], int]:
    """Every dvae.json read and checked, and the one image size they all take, before any weights are read."""
    configs = [read_config(path) for path in model_dirs]
    first = configs[0]
    size = image_size_for(first, size, model_dirs[0])
    for path, config in zip(model_dirs[1:], configs[1:]):
        if config["channels"] != first["channels"]:
            raise ConfigError(f"{path} reads {config['channels']}-channel images but {model_dirs[0]} reads "
                              f"{first['channels']}; compare models made for the same kind of images.")
        if size % config["downsampling"]:
            raise ConfigError(f"--size {size} is not a multiple of {path}'s downsampling factor "
                              f"{config['downsampling']}; pass a --size both models take.")
    return configs, size


def evaluate(model_dirs: list[str | Path], data: str, out: str | Path, size: int | None = None, split: str = "val",
             batch_size: int = 64, device: str = "auto", workers: int = 0, force: bool = False,
             data_options: list[str] | dict[str, Any] = (), progress: bool = True) -> dict[str, Any]:
    """Evaluate each export on the images of `data` (a folder or a data config); writes eval.json, eval.md,
    eval_grid.png and eval_usage.png into `out` and returns what eval.json holds."""
    model_dirs, out = [Path(p) for p in model_dirs], Path(out)
    for name, value, least in (("--batch-size", batch_size, 1), ("--workers", workers, 0)):
        if not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} {value} must be an integer of at least {least}.")
    check_out_dir(out, force)
    dev = resolve_device(device)
    configs, size = _check_models(model_dirs, size)
    dataset, sources, spec = open_images(data, size, configs[0]["channels"], split, data_options)
    tallies = [Tally(DVAE.from_pretrained(path, device=dev), config) for path, config in zip(model_dirs, configs)]
    originals = None
    with progress_bar(progress) as bar:
        task = bar.add_task("evaluating", total=len(sources))
        for images in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
            images = images.to(dev)
            if originals is None:
                originals = images[:GRID_IMAGES].cpu()
            for tally in tallies:
                tally.add(images)
            bar.advance(task, len(images))
    report = {"data": spec, "split": split, "image_size": size, "images": len(sources),
              "models": [{"path": str(path.resolve()), "K": tally.model.K, **tally.result()}
                         for path, tally in zip(model_dirs, tallies)]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "eval.json", lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    atomic_write(out / "eval.md", lambda f: f.write(render(report).encode()))
    save_png(_grid(originals, [t.first for t in tallies]), out / "eval_grid.png")
    _usage_plot(out / "eval_usage.png", [(str(p), t.counts) for p, t in zip(model_dirs, tallies)])
    for i, tally in enumerate(tallies):
        save_png(codebook_atlas(tally.model, tally.counts), out / f"eval_atlas{'' if len(tallies) == 1 else i}.png")
    return report


@torch.inference_mode()
def codebook_atlas(model: DVAE, counts: Tensor | None = None, limit: int = ATLAS_CODES) -> Tensor:
    """What each token means: every code decoded alone (a 1x1 token grid) into its patch of downsampling x
    downsampling pixels, the most used codes first (by `counts`; the unused after them), at most `limit` of them,
    enlarged to at least 16 pixels a side and laid out in a square grid."""
    from torchvision.utils import make_grid

    order = torch.arange(model.K) if counts is None else counts.argsort(descending=True, stable=True)
    codes = order[:limit].view(-1, 1, 1).to(model.codebook.device)
    mu, _ = model.split_output(model.decoder.forward_tokens(codes))
    patches = reconstruct(mu, model.eps).float().cpu()
    if patches.shape[1] == 1:
        patches = patches.expand(-1, 3, -1, -1)
    patches = F.interpolate(patches, scale_factor=max(1, math.ceil(16 / patches.shape[-1])), mode="nearest")
    return make_grid(patches, nrow=math.ceil(math.sqrt(len(patches))), padding=1, pad_value=1.0)


def render(report: dict[str, Any]) -> str:
    """eval.md: one row per model, the same images for all."""
    head = ["model", *(title for title, _ in COLUMNS.values())]
    rows = []
    for model in report["models"]:
        cells = [Path(model["path"]).name]
        for key, (_, fmt) in COLUMNS.items():
            value = model.get(key)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            cells.append("–" if missing else fmt.format(value))
        rows.append(cells)
    lines = [f"# dvae-eval: {report['images']} images of {report['image_size']}x{report['image_size']} "
             f"({json.dumps(report['data'])}, split {report['split']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += ["", "Reconstructions from argmax tokens (no noise), as validation computes them; bits/dim is the "
              "negative ELBO with the uniform prior, for logit-Laplace models with a learned scale. LPIPS and rFID "
              "are not computed: they need backbone weights that no installed package ships."]
    return "\n".join(lines) + "\n"


def _grid(originals: Tensor | None, reconstructions: list[Tensor | None]) -> Tensor:
    """Originals in the top row, each model's reconstructions in a row below, 2-pixel white gaps."""
    from torchvision.utils import make_grid

    rows = [originals, *reconstructions]
    rows = [r for r in rows if r is not None]
    if originals is not None and originals.shape[1] == 1:
        rows = [r.expand(-1, 3, -1, -1) for r in rows]
    return make_grid(torch.cat(rows), nrow=len(rows[0]), padding=2, pad_value=1.0)


def _usage_plot(path: Path, models: list[tuple[str, Tensor]]) -> None:
    """Each model's code frequencies, sorted, on a log scale: a flat curve uses the codebook evenly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, counts in models:
        frequencies = counts.sort(descending=True).values.double()
        frequencies = frequencies[frequencies > 0] / max(float(counts.sum()), 1.0)
        ax.plot(range(1, len(frequencies) + 1), frequencies.numpy(), label=f"{Path(name).name} (K={len(counts)})")
    ax.set_yscale("log")
    ax.set_xlabel("code, most frequent first")
    ax.set_ylabel("share of tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
