"""Step -> value schedules for the scale, temperature, KL weight and learning rate.

Every schedule goes from `start` to `end` over `steps` updates and then holds `end`, after an
optional linear warm-up from 0 over `warmup` updates (used by the learning rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("constant", "linear", "cosine", "exponential")


@dataclass(frozen=True)
class Schedule:
    kind: str
    start: float
    end: float
    steps: int
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"schedule kind {self.kind!r} is not known; use one of {', '.join(KINDS)}.")
        if self.steps < 0 or self.warmup < 0:
            raise ValueError(f"schedule steps ({self.steps}) and warmup ({self.warmup}) must be >= 0.")
        if self.kind == "exponential" and (self.start <= 0 or self.end <= 0):
            raise ValueError(
                f"an exponential schedule needs start and end > 0 (got {self.start}, {self.end})."
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.start * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.start
        t = 1.0 if self.steps == 0 else min(max(step - self.warmup, 0) / self.steps, 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * t))
        return self.start * (self.end / self.start) ** t


def constant(value: float) -> Schedule:
    return Schedule("constant", value, value, 0)
