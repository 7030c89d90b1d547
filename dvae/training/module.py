"""The LightningModule around `DVAE`: the ELBO, the schedules, AdamW, EMA, the validation metrics."""

from __future__ import annotations

import functools
import math
from dataclasses import fields

import lightning as L
import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel
from torchmetrics import MeanMetric, SumMetric

from dvae.errors import TrainingError
from dvae.losses import (
    LOSSES,
    logit_laplace_nll_mean,
    nll_to_bits_per_dim,
    pixel_nll_to_bits_per_dim,
    psnr,
    reconstruct,
    reconstruction_loss,
    ssim,
)
from dvae.model import DEFAULT_LOG_SCALE_FLOOR, DVAE, DVAEConfig
from dvae.nn.codebook import perplexity
from dvae.schedules import SCALE_MODES, SEED_SCALE, Schedule
from dvae.training.metrics import CodeCounts, EdgePSNR
from dvae.training.rng_state import rng_state, set_rng_state
from dvae.training.usage import (
    UsageWindow,
    batch_usage_deficit,
    choose_reseeds,
    collapse_advice,
    copy_rows,
    posterior_went_uniform,
    reseed_codes,
)


def ema_update(decay: float, averaged: list[Tensor], current: list[Tensor], num_averaged) -> None:
    """averaged <- decay * averaged + (1 - decay) * current, in place. A module-level function (bound with
    functools.partial) rather than a closure, so that ddp_spawn can pickle the module."""
    floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
    if floats:
        torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - decay)
    for a, c in zip(averaged, current):
        if not a.is_floating_point():
            a.copy_(c)


class NonFiniteTraining(TrainingError):
    """`guard.max_bad_steps` updates in a row had a non-finite loss or gradient."""


class DVAELightning(L.LightningModule):
    """Built from primitive hyper-parameters only, so `load_from_checkpoint(path)` is enough.

    The loss per sub-pixel is mean(rec) + beta * sum_positions(KL) / (H * W * C): the paper's
    normalisation of the whole ELBO by the number of sub-pixels.
    """

    def __init__(
        self,
        # objective
        pixel_eps: float = 0.1, loss: str = "logit_laplace",
        scale_mode: str = "learned", scale_value: float = SEED_SCALE,
        scale_start: float = 0.5, scale_end: float = 0.05, scale_steps: int = 1000,
        log_scale_floor: float = DEFAULT_LOG_SCALE_FLOOR,
        # schedules (paper shapes: cosine)
        tau_start: float = 1.0, tau_end: float = 1 / 16, tau_steps: int = 150_000,
        beta_start: float = 0.0, beta_end: float = 6.6, beta_steps: int = 5_000,
        # optimiser
        lr: float = 1e-4, lr_end: float = 1.25e-6, lr_warmup_steps: int = 0,
        lr_steps: int = 1_200_000, betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8, weight_decay: float = 1e-4, ema_decay: float = 0.999,
        # robustness: stop after this many non-finite updates in a row (each one is skipped)
        max_bad_steps: int = 10,
        # keeping the codebook in use (dvae/training/usage.py): the batch-usage term's weight, re-seeding dead codes
        # every N updates (0: never), and the window of training batches both look at
        usage_weight: float = 0.0, reseed_every: int = 0, usage_window: int = 100,
        # a reward for confident posteriors, each position's entropy H(q_i) normalised like the KL (0: off)
        entropy_weight: float = 0.0,
        # torch.compile: the fused loss kernel, and the training model's forward (see docs/benchmarks.md)
        compile_loss: bool = False, compile_model: bool = False,
        # channels-last (NHWC) activations and weights: oneDNN's fast convolution layout on CPUs and GPUs
        channels_last: bool = False,
        # the network: DVAEConfig's fields by name, its defaults (the paper's) for those not given; flat, so
        # checkpoints keep them as plain hyper-parameters
        **network,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is not known; use one of {', '.join(LOSSES)}.")
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale mode {scale_mode!r} is not known; use one of {', '.join(SCALE_MODES)}.")
        set_by_the_objective = {"eps": "pixel_eps", "learned_scale": "scale_mode"}
        for name in sorted(set(network) & set_by_the_objective.keys()):
            raise TypeError(f"DVAELightning takes the network's {name} through {set_by_the_objective[name]}.")
        unknown = sorted(set(network) - {f.name for f in fields(DVAEConfig)})
        if unknown:
            raise TypeError(f"DVAELightning got unknown arguments {', '.join(unknown)} (the network's: DVAEConfig).")
        self.save_hyperparameters()
        self.model = DVAE(DVAEConfig.from_hparams({**DVAEConfig().to_dict(), **self.hparams}))
        K = self.model.K
        self.ema = AveragedModel(self.model, multi_avg_fn=functools.partial(ema_update, ema_decay),
                                 use_buffers=True)
        self.ema.requires_grad_(False)
        if compile_model:
            self.model.compile()  # in place: the state-dict keys stay those of the plain model
        self.tau = Schedule("cosine", tau_start, tau_end, tau_steps)
        self.beta = Schedule("cosine", beta_start, beta_end, beta_steps)
        self.lr_schedule = Schedule("cosine", lr, lr_end, lr_steps, warmup=lr_warmup_steps)
        if scale_mode == "constant":
            self.scale = Schedule("constant", scale_value, scale_value, 0)
        elif scale_mode != "learned":
            self.scale = Schedule(scale_mode, scale_start, scale_end, scale_steps)
        self.val_psnr = MeanMetric()
        self.val_psnr_mean_color = MeanMetric()
        self.val_psnr_edges = EdgePSNR()
        self.val_ssim = MeanMetric()
        self.val_bits_per_dim = MeanMetric()
        self.val_code_counts = CodeCounts(K)
        self.val_images = SumMetric()  # synchronised: each validation image counted once over all ranks
        self.usage = UsageWindow(K, usage_window)
        self.bad_steps_in_a_row = 0
        self.bad_steps_total = 0
        self.step_metrics: dict = {}  # this update's training metrics (training_step), for on_train_batch_end
        self.first_bad_step: int | None = None
        self.skip_this_update = False

    @property
    def ema_model(self) -> DVAE:
        """The averaged weights: validated, checkpointed and exported."""
        return self.ema.module

    def collapse_advice(self) -> str:
        """What to try if the codebook collapsed, for this run's settings and its last training KL."""
        uniform = posterior_went_uniform(getattr(self, "last_kl_per_position", None), self.model.K)
        return collapse_advice(self.hparams.usage_weight, self.model.config.hard, uniform)

    def log_scale_for(self, model: DVAE, mu: Tensor, log_scale: Tensor | None) -> Tensor | None:
        """ln b for the loss: the decoder's when learned, else the scheduled value at this step."""
        if model.learned_scale:
            return log_scale
        return mu.new_tensor(math.log(self.scale(self.global_step)))

    def elbo_terms(self, model: DVAE, x: Tensor, logits: Tensor, mu: Tensor,
                   log_scale: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(mean reconstruction loss per sub-pixel, KL per sub-pixel, ln b used)."""
        log_scale = self.log_scale_for(model, mu, log_scale)
        if self.hparams.loss == "logit_laplace":
            rec = logit_laplace_nll_mean(x, mu, log_scale, self.hparams.pixel_eps, fused=self.hparams.compile_loss)
        else:
            rec = reconstruction_loss(self.hparams.loss, x, mu, log_scale, self.hparams.pixel_eps).mean()
        kl = model.kl_per_subpixel(logits, x)
        return rec, kl, log_scale

    def setup(self, stage: str) -> None:
        # before the strategy wraps the model (DDP) and builds the optimiser: the same Parameter objects
        if stage == "fit" and self.hparams.channels_last:
            self.use_channels_last(True)

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self.use_channels_last(False)  # what users load and export computes exactly like dvae-export's

    def use_channels_last(self, enabled: bool) -> None:
        """NHWC weights (and batches, in on_after_batch_transfer) for training, or back to NCHW."""
        layout = torch.channels_last if enabled else torch.contiguous_format
        self.model.to(memory_format=layout)
        self.ema.to(memory_format=layout)
        self.channels_last_active = enabled

    def on_after_batch_transfer(self, batch: Tensor, dataloader_idx: int) -> Tensor:
        if getattr(self, "channels_last_active", False):
            return batch.contiguous(memory_format=torch.channels_last)
        return batch

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        step = self.global_step
        tau, beta = self.tau(step), self.beta(step)
        out = self.model(batch, tau)
        rec, kl, log_scale = self.elbo_terms(self.model, batch, out.logits, out.mu, out.log_scale)
        loss = rec + beta * kl
        logs = {"train/loss": loss, "train/nll": rec, "train/kl": kl, "train/tau": tau,
                "train/beta": beta, "train/lr": self.optimizers().param_groups[0]["lr"]}
        if self.hparams.usage_weight > 0:
            # normalised like the KL: as if every latent position paid the batch's deficit
            deficit = batch_usage_deficit(out.logits)
            loss = loss + self.hparams.usage_weight * deficit * out.logits[0, 0].numel() / batch[0].numel()
            logs["train/usage_deficit"] = deficit
        if self.hparams.entropy_weight > 0:
            # sum_i H(q_i) = positions * ln K - sum_i KL(q_i || U): the same KL with the opposite sign, from
            # update 0 on, so that a posterior drifting to uniform is pushed back (docs/collapse.md)
            positions = out.logits[0, 0].numel()
            entropy = positions * math.log(self.model.K) / batch[0].numel() - kl
            loss = loss + self.hparams.entropy_weight * entropy
            logs["train/entropy"] = entropy
        self.usage.add(out.logits.detach().argmax(dim=1))
        # for the collapse advice (callbacks.py): a KL near 0 means the posterior went uniform, not one-hot
        self.last_kl_per_position = kl.detach() * batch[0].numel() / out.logits[0, 0].numel()
        logs["train/codes_used"] = (self.usage.total > 0).float().mean()  # tensors: no sync per update
        logs["train/perplexity"] = perplexity(self.usage.total)
        if log_scale is not None:
            logs["train/scale"] = log_scale.detach().exp().mean()
        self.step_metrics = logs  # logged in on_train_batch_end, on the updates the loggers write
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=batch.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """The training metrics go to Lightning only on the updates its loggers write (every
        trainer.log_every_n_steps, and when the run stops: Lightning's own rule, which its
        LearningRateMonitor reads too): self.log is Python work that other updates would throw away."""
        if self.step_metrics and self.trainer._logger_connector.should_update_logs:
            self.step_metrics["train/skipped_updates"] = float(self.bad_steps_total)
            self.log_dict(self.step_metrics, batch_size=batch.shape[0])
        self.step_metrics = {}  # no autograd graph kept past the update

    def on_before_optimizer_step(self, optimizer) -> None:
        """The non-finite guard: an update whose loss or gradient is not finite is skipped (AdamW leaves
        a parameter whose gradient is None untouched) and counted; see `optimizer_step`."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())) if grads else True
        self.skip_this_update = not finite
        if not finite:
            for p in self.model.parameters():
                p.grad = None

    def optimizer_step(self, *args, **kwargs) -> None:
        """The update, then the EMA and the guard's bookkeeping: here rather than in on_train_batch_end,
        because callbacks (the periodic checkpoint) see the batch end before the module does."""
        super().optimizer_step(*args, **kwargs)
        step = self.global_step + 1  # the update just made
        if not self.skip_this_update:
            self.ema.update_parameters(self.model)
            self.bad_steps_in_a_row, self.first_bad_step = 0, None
            every = self.hparams.reseed_every
            if every and step % every == 0 and self.usage.full:
                self.reseed_dead_codes(step)
        else:
            self.skip_this_update = False
            self.bad_steps_total += 1
            self.bad_steps_in_a_row += 1
            self.first_bad_step = self.first_bad_step or step
            self.print(f"dvae-train: step {step}: the loss or a gradient is not finite; this update was skipped "
                       f"({self.bad_steps_in_a_row} in a row, {self.bad_steps_total} in all).")
        if self.bad_steps_in_a_row >= self.hparams.max_bad_steps:
            raise NonFiniteTraining(
                f"the loss or gradients were not finite for {self.bad_steps_in_a_row} updates in a row (steps "
                f"{self.first_bad_step}-{step}, guard.max_bad_steps={self.hparams.max_bad_steps}), so training "
                f"stopped; the weights are those after update {self.first_bad_step - 1}, the last good one"
            )

    def reseed_dead_codes(self, step: int) -> int:
        """Codes that no training batch of the usage window chose copy a busy code (`reseed_codes`), in the
        training model, its optimiser moments and the EMA alike. Every rank decides from the same counts
        (summed over ranks) and the same generator, so the replicas stay identical. Returns how many."""
        counts = self.usage.total.to(self.device, copy=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        generator = torch.Generator().manual_seed(step)
        dead, sources = choose_reseeds(counts.cpu(), generator)
        if dead.numel() == 0:
            return 0
        dead, sources = dead.to(self.device), sources.to(self.device)
        encoder_out, codebook = self.model.encoder.blocks.output.conv, self.model.decoder.blocks.input
        reseed_codes(encoder_out, codebook, dead, sources, generator)
        optimizer = self.optimizers()
        optimizer = getattr(optimizer, "optimizer", optimizer)
        ema = self.ema_model
        for param, ema_param, dim in ((encoder_out.weight, ema.encoder.blocks.output.conv.weight, 0),
                                      (encoder_out.bias, ema.encoder.blocks.output.conv.bias, 0),
                                      (codebook.weight, ema.decoder.blocks.input.weight, 1)):
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in optimizer.state.get(param, {}):
                    copy_rows(optimizer.state[param][moment], dim, dead, sources)
            with torch.no_grad():
                ema_param.index_copy_(dim, dead, param.index_select(dim, dead))
        return int(dead.numel())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Everything `resume` needs beyond what Lightning saves: the RNG streams (the Gumbel noise comes
        from torch's) and the non-finite guard's counters."""
        checkpoint["dvae_rng"] = rng_state()
        checkpoint["dvae_usage"] = self.usage.state_dict()
        checkpoint["dvae_guard"] = {"bad_steps_total": self.bad_steps_total,
                                    "bad_steps_in_a_row": self.bad_steps_in_a_row,
                                    "first_bad_step": self.first_bad_step}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("dvae_rng")
        if rng is not None:
            set_rng_state(rng)
        if "dvae_usage" in checkpoint:
            self.usage.load_state_dict(checkpoint["dvae_usage"])
        guard = checkpoint.get("dvae_guard", {})
        self.bad_steps_total = guard.get("bad_steps_total", 0)
        self.bad_steps_in_a_row = guard.get("bad_steps_in_a_row", 0)
        self.first_bad_step = guard.get("first_bad_step")

    @torch.no_grad()
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        model = self.ema_model
        x = batch
        logits = model.logits(x)
        tokens = logits.argmax(dim=1)
        mu, log_scale = model.split_output(model.decoder.forward_tokens(tokens))
        x_hat = reconstruct(mu, model.eps)
        mean_color = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        self.val_psnr.update(psnr(x, x_hat))
        self.val_psnr_mean_color.update(psnr(x, mean_color))
        self.val_psnr_edges.update(x, x_hat)
        self.val_ssim.update(ssim(x, x_hat))
        self.val_code_counts.update(tokens)
        self.val_images.update(float(x.shape[0]))
        rec, kl, _ = self.elbo_terms(model, x, logits, mu, log_scale)
        bits = (nll_to_bits_per_dim(rec + kl, model.eps) if self.hparams.loss == "logit_laplace"
                else pixel_nll_to_bits_per_dim(rec + kl))
        self.val_bits_per_dim.update(bits, weight=x.shape[0])

    def on_validation_epoch_end(self) -> None:
        counts = self.val_code_counts.compute()
        self.last_val_code_counts = counts.detach().cpu()  # for the usage histogram (callbacks.py)
        metrics = {
            "val/psnr": self.val_psnr.compute(),
            "val/psnr_mean_color": self.val_psnr_mean_color.compute(),
            "val/psnr_edges": self.val_psnr_edges.compute(),
            "val/ssim": self.val_ssim.compute(),
            "val/perplexity": perplexity(counts),
            "val/codes_used_fraction": (counts > 0).float().mean(),
            "val/images": self.val_images.compute(),
        }
        metrics["val/bits_per_dim"] = self.val_bits_per_dim.compute()
        self.log_dict(metrics, prog_bar=False)
        self.log("val_psnr", metrics["val/psnr"], prog_bar=True, logger=False)
        self.reset_validation_metrics()

    def on_validation_epoch_start(self) -> None:
        # reset() gives every state a fresh tensor: under ddp_spawn on a CPU the states arrive in
        # shared memory (Lightning unshares parameters and buffers, not metric states), and the ranks
        # would otherwise add into one tensor.
        self.reset_validation_metrics()

    def reset_validation_metrics(self) -> None:
        for metric in (self.val_psnr, self.val_psnr_mean_color, self.val_psnr_edges, self.val_ssim,
                       self.val_bits_per_dim, self.val_code_counts, self.val_images):
            metric.reset()

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if name.endswith("bias") else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas), eps=hp.adam_eps,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.lr_schedule(step) / hp.lr
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
