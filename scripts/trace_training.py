"""Trace what the codebook and the encoder do at every training update of a dvae-train run.

    .venv/bin/python scripts/trace_training.py OUT.csv [Hydra overrides ...]
    .venv/bin/python scripts/trace_training.py --plot OUT.png A.csv [B.csv ...]   # the curves side by side

Runs `dvae.training.run.train` with the overrides (into a temporary run directory unless hydra.run.dir is
given) and writes one CSV row per update: the KL per sub-pixel, the perplexity of the batch's argmax
tokens and of its batch-averaged posterior, the mean per-position entropy of the posterior, the spread
of the encoder's logits, ln b, and the gradient norms reaching the encoder's output layer, the whole
encoder and the codebook. docs/collapse.md was made with it.
"""

from __future__ import annotations

import csv
import math
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_module


class TrainingTrace(L.Callback):
    def __init__(self, path: Path):
        self.path = path
        self.rows_written = 0
        self.logits: torch.Tensor | None = None
        self.grads: dict = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        def keep(module, inputs, output):
            if module.training:
                self.logits = output.detach()
        pl_module.model.encoder.register_forward_hook(keep)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        def norm(params) -> float:
            grads = [p.grad.float().norm() for p in params if p.grad is not None]
            return float(torch.stack(grads).norm()) if grads else float("nan")
        model = pl_module.model
        self.grads = {"grad_encoder": norm(model.encoder.parameters()),
                      "grad_encoder_out": norm(model.encoder.blocks.output.parameters()),
                      "grad_codebook": norm(model.decoder.blocks.input.parameters()),
                      "grad_decoder": norm(model.decoder.parameters())}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logits = self.logits.float()
        K = logits.shape[1]
        log_q = logits.log_softmax(dim=1)
        q = log_q.exp()
        entropy = -(q * log_q).sum(dim=1).mean()
        mean_q = q.mean(dim=(0, 2, 3))
        tokens = logits.argmax(dim=1).flatten()
        counts = torch.bincount(tokens, minlength=K).double()
        p = counts / counts.sum()
        token_entropy = -(p[p > 0] * p[p > 0].log()).sum()
        top2 = logits.topk(2, dim=1).values
        metrics = pl_module.step_metrics  # this update's (Lightning's callback_metrics only every n updates)
        row = {
            "step": trainer.global_step,
            "loss": float(metrics.get("train/loss", float("nan"))),
            "nll": float(metrics.get("train/nll", float("nan"))),
            "kl": float(metrics.get("train/kl", float("nan"))),
            "beta": pl_module.beta(trainer.global_step - 1),
            "tau": pl_module.tau(trainer.global_step - 1),
            "lr": optimizer_lr(trainer),
            "posterior_entropy": float(entropy),
            "batch_perplexity_soft": math.exp(float(-(mean_q * mean_q.clamp_min(1e-30).log()).sum())),
            "batch_perplexity_tokens": math.exp(float(token_entropy)),
            "batch_codes_used": int((counts > 0).sum()),
            "logit_std": float(logits.std(dim=1).mean()),
            "logit_margin": float((top2[:, 0] - top2[:, 1]).mean()),
            "log_scale": float(metrics.get("train/scale", float("nan"))) if "train/scale" in metrics else float("nan"),
            **self.grads,
        }
        if not math.isnan(row["log_scale"]):
            row["log_scale"] = math.log(row["log_scale"])
        with open(self.path, "a" if self.rows_written else "w", newline="") as file:  # a stopped run keeps its trace
            writer = csv.DictWriter(file, fieldnames=list(row))
            if not self.rows_written:
                writer.writeheader()
            writer.writerow(row)
        self.rows_written += 1


def optimizer_lr(trainer) -> float:
    return float(trainer.optimizers[0].param_groups[0]["lr"])


PLOTTED = (("kl", "KL per sub-pixel (nats)", "linear"), ("posterior_entropy", "posterior entropy (nats)", "linear"),
           ("batch_perplexity_tokens", "batch perplexity (argmax)", "log"),
           ("logit_margin", "logit margin, top-1 minus top-2", "log"),
           ("grad_encoder", "gradient norm reaching the encoder", "log"), ("nll", "reconstruction nll", "linear"),
           ("log_scale", "ln b (mean)", "linear"), ("tau", "temperature and KL weight", "linear"))


def plot(out: Path, traces: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7), dpi=100)
    for trace in traces:
        with open(trace, newline="") as file:
            rows = list(csv.DictReader(file))
        steps = [int(r["step"]) for r in rows]
        for ax, (key, title, scale) in zip(axes.flat, PLOTTED):
            ax.plot(steps, [float(r[key]) for r in rows], label=trace.stem, linewidth=1)
            if key == "tau":
                ax.plot(steps, [float(r["beta"]) for r in rows], linestyle="--", linewidth=1)
            ax.set_title(title, fontsize=10)
            ax.set_yscale(scale)
    for ax in axes[1]:
        ax.set_xlabel("update")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    print(f"plot: {out}")


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    if argv[0] == "--plot":
        plot(Path(argv[1]), [Path(a) for a in argv[2:]])
        return
    out, overrides = Path(argv[0]), argv[1:]
    from dvae.training.run import train

    with initialize_config_module(config_module="dvae.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")), None)
    run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="dvae-trace-"))
    value = train(cfg, run_dir, extra_callbacks=[TrainingTrace(out)])
    print(f"trace: {out}; run directory: {run_dir}; final psnr {value:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
