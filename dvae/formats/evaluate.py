"""Evaluating exported tokenizers on a set of images, as the field compares them: reconstruction quality
from argmax tokens (PSNR, SSIM, MS-SSIM, and LPIPS and rFID with the user's backbone weights), bits/dim, and
how the codebook is used. Batch by batch, so memory does not grow with the number of images; several models
see the same images and the same crops."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dvae.data.image_files import header_problem
from dvae.data.images import open_images, save_png
from dvae.errors import ConfigError
from dvae.files import atomic_write
from dvae.formats.devices import progress_bar, resolve_device
from dvae.formats.encode import image_size_for
from dvae.formats.perceptual import FeatureStats, frechet_distance, load_fid_inception, load_lpips, min_lpips_size
from dvae.losses import MS_SSIM_MIN_SIZE, logit_laplace_nll_mean, ms_ssim, nll_to_bits_per_dim, psnr, reconstruct, ssim
from dvae.model import DVAE
from dvae.nn.codebook import perplexity
from dvae.pretrained import check_out_dir, read_config

TOP = 10  # the share of tokens the TOP most frequent codes take
GRID_IMAGES = 8  # originals and reconstructions drawn in eval_grid.png
ATLAS_CODES = 1024  # codes drawn in eval_atlas.png (all of them for K <= 1024)
STANDARD_METRICS = ("psnr", "ssim", "ms_ssim", "bits_per_dim", "usage")  # need nothing but the model
WEIGHTED_METRICS = ("lpips", "rfid")  # need backbone weights that no package ships
METRICS = STANDARD_METRICS + WEIGHTED_METRICS
COLUMNS = {"psnr": ("PSNR", "{:.2f}"), "ssim": ("SSIM", "{:.4f}"), "ms_ssim": ("MS-SSIM", "{:.4f}"),
           "lpips": ("LPIPS", "{:.4f}"), "rfid": ("rFID", "{:.2f}"), "bits_per_dim": ("bits/dim", "{:.3f}"),
           "codes_used": ("codes used", "{:d}"), "codes_used_fraction": ("of K", "{:.1%}"),
           "perplexity": ("perplexity", "{:.1f}"), "top10_share": (f"top-{TOP} share", "{:.1%}"),
           "tokens_per_second": ("tokens/s", "{:,.0f}")}
USAGE_COLUMNS = ("codes_used", "codes_used_fraction", "perplexity", "top10_share", "tokens_per_second")


def parse_metrics(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """--metrics psnr,ssim,lpips (or a list) -> the metric names, checked; `standard` stands for
    STANDARD_METRICS and `all` for every metric."""
    chosen: list[str] = []
    for name in _names(text):
        expanded = {"standard": STANDARD_METRICS, "all": METRICS}.get(name, (name,))
        for metric in expanded:
            if metric not in METRICS:
                raise ConfigError(f"--metrics names {metric!r}, which is not a metric; choose from "
                                  f"{', '.join(METRICS)} (or standard, all).")
            if metric not in chosen:
                chosen.append(metric)
    if not chosen:
        raise ConfigError("--metrics is empty; name at least one of " + ", ".join(METRICS) + ".")
    return tuple(chosen)


def _names(text: str | list[str] | tuple[str, ...]) -> list[str]:
    names = text.split(",") if isinstance(text, str) else list(text)
    return [name.strip().lower().replace("-", "_") for name in names]


def usage_figures(counts: Tensor, top: int = TOP) -> dict[str, Any]:
    """How a set of tokens uses a codebook of K = len(counts) codes: codes used (and as a fraction of K), the
    perplexity of the code frequencies, and the share of all tokens taken by the `top` most frequent codes."""
    counts = counts.to(torch.long)
    total = int(counts.sum())
    used = int((counts > 0).sum())
    return {"codes_used": used, "codes_used_fraction": used / counts.numel(),
            "perplexity": float(perplexity(counts)) if total else float("nan"),
            "top10_share": float(counts.sort(descending=True).values[:top].sum()) / total if total else float("nan")}


class Perceptual:
    """The backbones of LPIPS and rFID, loaded once and shared by every model, and the originals' Inception
    statistics (the reference every model's reconstructions are compared with)."""

    def __init__(self, metrics: tuple[str, ...], weights_dir: Path | None, lpips_net: str, device: torch.device):
        self.lpips = self.inception = None
        self.weights: dict[str, Any] = {}
        if "lpips" in metrics:
            net, comparable, used = load_lpips(weights_dir, lpips_net)
            self.lpips = net.to(device)
            self.weights["lpips"] = {"network": f"LPIPS v0.1 on {lpips_net}net features", "files": used,
                                     "comparable": comparable}
        if "rfid" in metrics:
            net, comparable, used = load_fid_inception(weights_dir)
            self.inception = net.to(device)
            self.weights["rfid"] = {"network": "FID Inception v3 (pool3, 2048 features)", "files": [used],
                                    "comparable": comparable}
        self.reference = FeatureStats()

    @torch.inference_mode()
    def add_originals(self, x: Tensor) -> None:
        if self.inception is not None:
            self.reference.add(self.inception(x))


class Tally:
    """One model's running sums over the images seen so far."""

    def __init__(self, model: DVAE, config: dict[str, Any], metrics: tuple[str, ...], perceptual: Perceptual):
        self.model, self.config, self.metrics, self.perceptual = model, config, metrics, perceptual
        # a fixed or scheduled scale is not in the weights: the b the export recorded (at its checkpoint's step)
        scale = config.get("scale")
        self.fixed_log_scale = math.log(scale) if isinstance(scale, (int, float)) and scale > 0 else None
        self.with_bits = ("bits_per_dim" in metrics and config.get("loss", "logit_laplace") == "logit_laplace"
                          and (model.learned_scale or self.fixed_log_scale is not None))
        self.images = 0
        self.sums = {name: 0.0 for name in ("psnr", "ssim", "ms_ssim", "lpips", "bits_per_dim")}
        self.seconds = 0.0
        self.counts = torch.zeros(model.K, dtype=torch.long)
        self.features = FeatureStats()
        self.first: Tensor | None = None  # the first batch's reconstructions, for the grid

    @torch.inference_mode()
    def add(self, x: Tensor) -> None:
        """The validation step's measures (argmax tokens, no noise) on a batch, and those asked for besides."""
        model, metrics, sums = self.model, self.metrics, self.sums
        start = time.perf_counter()
        logits = model.logits(x)
        tokens = logits.argmax(dim=1)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        self.seconds += time.perf_counter() - start
        mu, log_scale = model.split_output(model.decoder.forward_tokens(tokens))
        x_hat = reconstruct(mu, model.eps)
        for name, measure in (("psnr", psnr), ("ssim", ssim), ("ms_ssim", ms_ssim)):
            if name in metrics and (name != "ms_ssim" or min(x.shape[-2:]) >= MS_SSIM_MIN_SIZE):
                sums[name] += float(measure(x, x_hat).sum())
        if self.perceptual.lpips is not None:
            sums["lpips"] += float(self.perceptual.lpips(x, x_hat).sum())
        if self.perceptual.inception is not None:
            self.features.add(self.perceptual.inception(x_hat))
        if self.with_bits:
            if log_scale is None:
                log_scale = mu.new_tensor(self.fixed_log_scale)
            rec = logit_laplace_nll_mean(x, mu, log_scale, model.eps)
            kl = model.kl_per_subpixel(logits, x)
            sums["bits_per_dim"] += float(nll_to_bits_per_dim(rec + kl, model.eps)) * len(x)
        self.counts += torch.bincount(tokens.flatten().cpu(), minlength=model.K)
        self.images += len(x)
        if self.first is None:
            self.first = x_hat[:GRID_IMAGES].cpu()

    def result(self, image_size: int) -> dict[str, Any]:
        n = max(self.images, 1)
        measured = {"psnr": True, "ssim": True, "ms_ssim": image_size >= MS_SSIM_MIN_SIZE,
                    "lpips": self.perceptual.lpips is not None, "bits_per_dim": self.with_bits}
        result: dict[str, Any] = {name: self.sums[name] / n if name in self.metrics and measured[name] else None
                                  for name in ("psnr", "ssim", "ms_ssim", "lpips")}
        if "rfid" in self.metrics:
            result["rfid"] = frechet_distance(self.perceptual.reference, self.features)
        result["bits_per_dim"] = self.sums["bits_per_dim"] / n if self.with_bits else None
        if "usage" in self.metrics:
            tokens = int(self.counts.sum())
            result.update(usage_figures(self.counts),
                          tokens_per_second=tokens / self.seconds if self.seconds else None)
        return result


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


def _check_metrics(metrics: tuple[str, ...], asked: bool, size: int, lpips_net: str) -> None:
    """Metrics the image size cannot give, refused before any work; MS-SSIM only when named (`asked`): within
    `standard` or `all` it is given where the size allows."""
    if asked and "ms_ssim" in metrics and size < MS_SSIM_MIN_SIZE:
        raise ConfigError(f"--metrics ms_ssim needs images of at least {MS_SSIM_MIN_SIZE} pixels a side (its five "
                          f"scales each halve the image) but --size is {size}; pass --size {MS_SSIM_MIN_SIZE} or "
                          f"more, or leave ms_ssim out.")
    if "lpips" in metrics and size < min_lpips_size(lpips_net):
        raise ConfigError(f"--metrics lpips needs images of at least {min_lpips_size(lpips_net)} pixels a side for "
                          f"the {lpips_net} backbone but --size is {size}; pass a larger --size or leave lpips out.")


def _check_image_headers(dataset: Dataset) -> None:
    """A folder's files that are not images at all, refused before any weights are read."""
    for path in getattr(dataset, "paths", ()):
        problem = header_problem(path)
        if problem is not None:
            raise ConfigError(f"{path} cannot be read as an image ({problem}); remove or replace it and run the "
                              f"command again.")


def evaluate(model_dirs: list[str | Path], data: str, out: str | Path, size: int | None = None, split: str = "val",
             batch_size: int = 64, device: str = "auto", workers: int = 0, force: bool = False,
             data_options: list[str] | dict[str, Any] = (), progress: bool = True,
             metrics: str | tuple[str, ...] | None = None, weights_dir: str | Path | None = None,
             lpips_net: str = "alex") -> dict[str, Any]:
    """Evaluate each export on the images of `data` (a folder or a data config); writes eval.json, eval.md,
    eval_grid.png, eval_usage.png and eval_atlas.png into `out` and returns what eval.json holds.

    `metrics` (default STANDARD_METRICS) may add lpips and rfid, which read their backbone weights from
    `weights_dir` or the torch hub cache; a missing file is refused before any model is read."""
    model_dirs, out = [Path(p) for p in model_dirs], Path(out)
    for name, value, least in (("--batch-size", batch_size, 1), ("--workers", workers, 0)):
        if not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} {value} must be an integer of at least {least}.")
    chosen = parse_metrics(STANDARD_METRICS if metrics is None else metrics)
    if lpips_net not in ("alex", "vgg"):
        raise ConfigError(f"--lpips-net {lpips_net} is not known; use alex (the published default) or vgg.")
    check_out_dir(out, force)
    dev = resolve_device(device)
    configs, size = _check_models(model_dirs, size)
    _check_metrics(chosen, metrics is not None and "ms_ssim" in _names(metrics), size, lpips_net)
    dataset, sources, spec = open_images(data, size, configs[0]["channels"], split, data_options)
    _check_image_headers(dataset)
    if "rfid" in chosen and len(sources) < 2:
        raise ConfigError(f"--metrics rfid compares feature covariances and needs at least 2 images, but --data {data} "
                          f"has {len(sources)}; evaluate more images or leave rfid out.")
    perceptual = Perceptual(chosen, Path(weights_dir).expanduser() if weights_dir else None, lpips_net, dev)
    tallies = [Tally(DVAE.from_pretrained(path, device=dev), config, chosen, perceptual)
               for path, config in zip(model_dirs, configs)]
    originals = None
    with progress_bar(progress) as bar:
        task = bar.add_task("evaluating", total=len(sources))
        for images in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
            images = images.to(dev)
            if originals is None:
                originals = images[:GRID_IMAGES].cpu()
            perceptual.add_originals(images)
            for tally in tallies:
                tally.add(images)
            bar.advance(task, len(images))
    report = {"data": spec, "split": split, "image_size": size, "images": len(sources), "metrics": list(chosen),
              "weights": perceptual.weights,
              "models": [{"path": str(path.resolve()), "K": tally.model.K, **tally.result(size)}
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
    """eval.md: one row per model, the same images for all, the columns of the metrics asked for, and what
    each metric was computed with (or why it was not)."""
    chosen = report.get("metrics", STANDARD_METRICS)
    keys = [key for key in COLUMNS if key in chosen or (key in USAGE_COLUMNS and "usage" in chosen)]
    head = ["model", *(COLUMNS[key][0] for key in keys)]
    rows = []
    for model in report["models"]:
        cells = [Path(model["path"]).name]
        for key in keys:
            value = model.get(key)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            cells.append("–" if missing else COLUMNS[key][1].format(value))
        rows.append(cells)
    lines = [f"# dvae-eval: {report['images']} images of {report['image_size']}x{report['image_size']} "
             f"({json.dumps(report['data'])}, split {report['split']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    notes = ["Reconstructions from argmax tokens (no noise), as validation computes them, of the images as "
             "validation sees them (a folder's: the shorter side resized to the size, the centre square; a data "
             "config's: its split's own crops). bits/dim is the negative ELBO with the uniform prior, for "
             "logit-Laplace models (a fixed or scheduled scale at the b the export recorded)."]
    if "ms_ssim" in chosen and report["image_size"] < MS_SSIM_MIN_SIZE:
        notes.append(f"MS-SSIM is not given: its five scales need images of at least {MS_SSIM_MIN_SIZE} pixels.")
    weights = report.get("weights", {})
    for metric, title in (("lpips", "LPIPS"), ("rfid", "rFID")):
        if metric not in chosen:
            notes.append(f"{title} was not asked for (--metrics {metric}); it needs backbone weights that no "
                         f"installed package ships.")
            continue
        used = weights[metric]
        files = ", ".join(Path(f).name for f in used["files"])
        verdict = ("the published weights" if used["comparable"] else
                   "**other weights than the published ones: not comparable to published numbers**")
        notes.append(f"{title}: {used['network']} from {files} ({verdict}).")
    if "rfid" in chosen and report["images"] < 2048:
        notes.append(f"rFID from {report['images']} images is biased upwards (published figures use 50,000); "
                     f"compare it only with rFID on the same images.")
    return "\n".join([*lines, "", *(f"- {note}" for note in notes)]) + "\n"


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
