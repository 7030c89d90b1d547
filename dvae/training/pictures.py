"""The pictures a run leaves in images/ when it ends: the codebook atlas (what each token means) and the
training curves (one PNG of loss, KL, PSNR, perplexity and codes used against the update)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from torch import Tensor

from dvae.data.images import save_png
from dvae.files import atomic_write
from dvae.formats.evaluate import codebook_atlas
from dvae.model import DVAE

# (title, the logged keys drawn in it)
CURVES = (("loss", ("train/loss",)), ("KL per sub-pixel", ("train/kl",)),
          ("PSNR (dB)", ("val/psnr", "val/psnr_mean_color")),
          ("perplexity", ("train/perplexity", "val/perplexity")),
          ("codes used (share of K)", ("train/codes_used", "val/codes_used_fraction")))


def write_run_pictures(run_dir: Path, model: DVAE, code_counts: Tensor | None) -> list[Path]:
    """images/codebook_atlas.png, and images/training_curves.png when the run logged to logs/metrics.csv."""
    images = run_dir / "images"
    written = [images / "codebook_atlas.png"]
    save_png(codebook_atlas(model, code_counts), written[0])
    metrics_csv = run_dir / "logs" / "metrics.csv"
    if metrics_csv.is_file():
        written.append(images / "training_curves.png")
        plot_curves(metrics_csv, written[-1])
    return written


def plot_curves(metrics_csv: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with metrics_csv.open(newline="") as file:
        rows = list(csv.DictReader(file))
    last = max((float(row["step"]) for row in rows if row.get("step")), default=1.0)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, CURVES):
        for key in keys:
            points = [(float(row["step"]), float(row[key])) for row in rows if row.get(key) and row.get("step")]
            points = [(x, y) for x, y in points if math.isfinite(y)]
            if points:
                ax.plot(*zip(*points), marker="o" if key.startswith("val/") else None, markersize=3,
                        label=key.removeprefix("train/").removeprefix("val/") + (" (val)" if key.startswith("val/")
                                                                                   else ""))
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("update")
        ax.set_xlim(0, last * 1.02)  # every panel on the run's whole length
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize="x-small")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
