"""Every random-number stream of a training process, as a checkpoint can hold it (tensors and numbers, which
`torch.load(weights_only=True)` accepts), so that a resumed run draws the same numbers as one never stopped."""

from __future__ import annotations

import random

import numpy as np
import torch


def numpy_rng_state() -> dict:
    """numpy's global RNG state as tensors and numbers, which `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


def rng_state() -> dict:
    """torch's (the Gumbel noise comes from it), numpy's, Python's and every CUDA device's generator."""
    return {"torch": torch.get_rng_state(), "numpy": numpy_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    set_numpy_rng_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
