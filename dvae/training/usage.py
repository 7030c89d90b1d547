"""Keeping the codebook in use: how many codes recent batches chose, the batch-usage term, and
re-seeding codes nobody chooses. Plain torch; the LightningModule wires them into training.

Why these exist (docs/collapse.md): the KL to the uniform prior is the information the code carries
plus the distance of the batch's average posterior from uniform. A run that collapses reaches the
largest KL possible with no information in the code, and stays there because a saturated softmax
passes no gradient back, to the reconstruction or to the KL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvae.nn.codebook import perplexity


def batch_usage_deficit(logits: Tensor) -> Tensor:
    """ln K - H(q_bar), with q_bar = softmax(logits) averaged over the batch and the positions:
    0 when the batch as a whole spreads over every code, ln K when it puts everything on one.
    Its gradient moves each position's posterior towards the codes the batch uses least."""
    K = logits.shape[1]
    log_q = F.log_softmax(logits.float(), dim=1)
    q_bar = log_q.exp().mean(dim=(0, 2, 3))
    entropy = -(q_bar * q_bar.clamp_min(torch.finfo(q_bar.dtype).tiny).log()).sum()
    return math.log(K) - entropy


class UsageWindow:
    """How often each code was the argmax over the last `size` training batches.

    A ring of per-batch histograms and their running sum: `add` is one bincount and two additions.
    """

    def __init__(self, K: int, size: int):
        if size < 1:
            raise ValueError(f"the usage window must hold at least one batch, got {size}.")
        self.K, self.size = K, size
        self.ring = torch.zeros(size, K, dtype=torch.long)
        self.total = torch.zeros(K, dtype=torch.long)
        self.batches = 0

    def add(self, tokens: Tensor) -> None:
        if self.total.device != tokens.device:  # kept where the tokens are: no copy, no sync per update on a GPU
            self.ring, self.total = self.ring.to(tokens.device), self.total.to(tokens.device)
        counts = torch.bincount(tokens.flatten(), minlength=self.K)
        slot = self.batches % self.size
        self.total += counts - self.ring[slot]
        self.ring[slot] = counts
        self.batches += 1

    @property
    def full(self) -> bool:
        return self.batches >= self.size

    def codes_used(self) -> int:
        return int((self.total > 0).sum())

    def perplexity(self) -> float:
        return float(perplexity(self.total))

    def state_dict(self) -> dict:
        return {"ring": self.ring.clone(), "total": self.total.clone(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        if state["ring"].shape != self.ring.shape:  # another window size or K: start counting again
            return
        self.ring.copy_(state["ring"])
        self.total.copy_(state["total"])
        self.batches = int(state["batches"])


def choose_reseeds(counts: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(dead codes, the busy code each one copies): every code with no use in `counts` is paired with
    a used code drawn in proportion to its use, so the busiest codes are split first."""
    dead = (counts == 0).nonzero().flatten()
    if dead.numel() == 0 or counts.sum() == 0:
        return dead[:0], dead[:0]
    sources = torch.multinomial(counts.double(), dead.numel(), replacement=True, generator=generator)
    return dead, sources


@torch.no_grad()
def reseed_codes(encoder_out: nn.Conv2d, codebook: nn.Conv2d, dead: Tensor, sources: Tensor,
                 generator: torch.Generator, noise: float = 0.01) -> None:
    """Give each dead code a copy of its source code: the encoder's output row (weight and bias) that
    scores it and the code vector the decoder reads, plus noise of `noise` times the copied values'
    spread, so that the two copies can part. Meant to split the source's positions between them; measured, the
    jitter shared by all positions decides the argmax the same way everywhere instead (docs/collapse.md)."""
    for weight, dim in ((encoder_out.weight, 0), (encoder_out.bias, 0), (codebook.weight, 1)):
        rows = weight.index_select(dim, sources)
        spread = rows.float().std() if rows.numel() > 1 else rows.float().abs().max()
        jitter = torch.randn(rows.shape, generator=generator).to(rows) * (noise * spread.clamp_min(1e-8))
        weight.index_copy_(dim, dead, rows + jitter)


@torch.no_grad()
def copy_rows(tensor: Tensor, dim: int, dead: Tensor, sources: Tensor) -> None:
    """tensor[dead] = tensor[sources] along `dim`: for the optimiser's moments of re-seeded codes."""
    tensor.index_copy_(dim, dead, tensor.index_select(dim, sources))


# A mean KL per position below this fraction of ln K: the posterior is (nearly) uniform at every position.
UNIFORM_KL_FRACTION = 0.01


def posterior_went_uniform(kl_per_position: float | Tensor | None, K: int) -> bool:
    """None (no training step seen yet) is not uniform."""
    return kl_per_position is not None and float(kl_per_position) < UNIFORM_KL_FRACTION * math.log(K)


def collapse_advice(usage_weight: float, hard: bool, uniform: bool = False) -> str:
    """What to try when the codebook collapsed: one clause naming config keys, for the warning and the verdict.
    The two collapses of docs/collapse.md need opposite cures: a one-hot collapse more usage weight, a uniform
    one less (the usage term is satisfied by uniform posteriors) or the entropy term."""
    if hard:  # measured: straight-through sampling lets the posterior go uniform whatever the usage weight
        return "try model.hard=false (straight-through samples let the posterior go uniform; docs/collapse.md)"
    if uniform:
        return (f"the posterior went uniform (the decoder ignores the code): try codebook.entropy_weight=1, a "
                f"smaller codebook.usage_weight (now {usage_weight:g}) or a lower optim.lr (docs/collapse.md)")
    return (f"try codebook.usage_weight={max(3 * usage_weight, 3):g} (now {usage_weight:g}) or a lower optim.lr "
            "(docs/collapse.md)")


def run_verdict(gain_db: float, codes_used_fraction: float, K: int, collapse_below: float,
                advice: str | None = None) -> tuple[bool, str]:
    """(healthy, one sentence) for the end of a run: the reconstructions must beat the mean-colour baseline
    and the validation tokens must use at least `collapse_below` of the K codes."""
    used = round(codes_used_fraction * K)
    facts = f"{gain_db:+.2f} dB over the mean-colour baseline, {used} of {K} codes used on the validation set"
    if gain_db > 0 and codes_used_fraction >= collapse_below:
        return True, f"the run is healthy: {facts}."
    advice = advice or collapse_advice(0.0, False)
    return False, f"the run is NOT healthy: {facts}; the tokens carry little information: {advice}."
