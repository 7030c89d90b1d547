"""Step -> value schedules for the scale, temperature, KL weight and learning rate.

Every schedule goes from `start` to `end` over `steps` updates and then holds `end`, after an
optional linear warm-up from 0 over `warmup` updates (used by the learning rate). Values always lie
between `start` and `end` (between 0 and `start` during the warm-up), whatever the step: a huge step
holds `end`, a negative one is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

KINDS = ("constant", "linear", "cosine", "exponential")
# The Laplace scale b: predicted by the decoder (learned, the paper), or one of the schedules above.
SCALE_MODES = ("learned", *KINDS)
# The fixed scale b of the seed note: the value a constant scale takes when none is given.
SEED_SCALE = 0.1


def _check_number(name: str, value: object) -> None:
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"schedule {name} must be a number, got {type(value).__name__} ({value!r}).")
    if not isinstance(value, Integral) and not math.isfinite(value):  # isfinite(10**400) would overflow
        raise ValueError(f"schedule {name} must be finite, got {value}.")


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
        for name in ("start", "end", "steps", "warmup"):
            _check_number(name, getattr(self, name))
        if self.steps < 0 or self.warmup < 0:
            raise ValueError(f"schedule steps ({self.steps}) and warmup ({self.warmup}) must be >= 0.")
        if self.kind == "exponential" and (self.start <= 0 or self.end <= 0):
            raise ValueError(
                f"an exponential schedule needs start and end > 0 (got {self.start}, {self.end})."
            )

    def __call__(self, step: int) -> float:
        return float(self._value(step))

    def _value(self, step: int) -> float:
        _check_number("step", step)
        if step < 0:
            raise ValueError(f"schedule step {step} must be >= 0 (steps count the updates from 0).")
        if step < self.warmup:
            return self.start * min((step + 1) / self.warmup, 1.0)
        if self.kind == "constant" or self.start == self.end:
            return self.start
        if step >= self.warmup + self.steps:  # no arithmetic on a huge step: it could overflow a float
            return self.end
        t = (step - self.warmup) / self.steps
        low, high = min(self.start, self.end), max(self.start, self.end)
        return min(max(self._between(t), low), high)  # rounding never leaves [start, end]

    def _between(self, t: float) -> float:
        """The value at fraction t in [0, 1) of the way, as a weighted mean (no end - start: it can overflow)."""
        if self.kind == "linear":
            return self.start * (1.0 - t) + self.end * t
        if self.kind == "cosine":
            w = 0.5 * (1.0 + math.cos(math.pi * t))
            return self.start * w + self.end * (1.0 - w)
        # exponential, start * (end / start) ** t, written as the larger end times a factor <= 1
        log_ratio = math.log(self.end) - math.log(self.start)
        if log_ratio <= 0:
            return self.start * math.exp(t * log_ratio)
        return self.end * math.exp((t - 1.0) * log_ratio)


def constant(value: float) -> Schedule:
    return Schedule("constant", value, value, 0)
