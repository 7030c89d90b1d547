"""Procedural images of flat-coloured rectangles, circles and triangles on a flat background.

Hard edges and flat regions are where a dVAE's blur shows most clearly, and the data costs nothing to
download. Sample i is a pure function of (key, i): the data set is the same in every run and process.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dvae.data.transforms import item_rng

ABSENT, RECTANGLE, CIRCLE, TRIANGLE = -1, 0, 1, 2
MAX_SHAPES = 4
# One row per shape: kind, centre x, centre y, radius, half-width, half-height, 3 triangle vertex angles.
PARAMS = 9


def shape_params(size: int, rng: random.Random) -> tuple[list[list[float]], list[list[int]]]:
    """MAX_SHAPES parameter rows (unused ones ABSENT) and MAX_SHAPES + 1 colours (row 0: background)."""
    count = rng.randint(1, MAX_SHAPES)
    colours = [[rng.randrange(256) for _ in range(3)] for _ in range(MAX_SHAPES + 1)]
    rows = []
    for i in range(MAX_SHAPES):
        radius = rng.uniform(size / 8, size / 3)
        # Roughly evenly spread vertex angles keep triangles from collapsing into slivers.
        start = rng.uniform(0, 2 * math.pi)
        angles = [start + j * 2 * math.pi / 3 + rng.uniform(-0.4, 0.4) for j in range(3)]
        kind = rng.randrange(3) if i < count else ABSENT
        rows.append([kind, rng.uniform(size / 8, size * 7 / 8), rng.uniform(size / 8, size * 7 / 8), radius,
                     radius * rng.uniform(0.4, 1.0), radius * rng.uniform(0.4, 1.0), *angles])
    return rows, colours


def render(params: np.ndarray, colours: np.ndarray, size: int) -> np.ndarray:
    """[B, MAX_SHAPES, PARAMS] float32 and [B, MAX_SHAPES + 1, 3] uint8 -> uint8 [B, 3, size, size].

    Later shapes are painted over earlier ones and nothing is antialiased, so edges are one pixel sharp.
    The whole batch is drawn at once, in numpy: torch spreads each of these small ops over its threads,
    which on a busy 2-core machine made a batch ~50x slower (124 ms instead of 2.7 ms).
    """
    p = params[..., None, None]  # [B, K, PARAMS, 1, 1] broadcasts against pixels [S, S]
    kind, cx, cy, radius, half_w, half_h = (p[:, :, i] for i in range(6))
    centres = np.arange(size, dtype=np.float32) + 0.5
    y, x = centres[:, None], centres[None, :]
    dx, dy = x - cx, y - cy  # [B, K, 1, S] and [B, K, S, 1]
    rectangle = (np.abs(dx) <= half_w) & (np.abs(dy) <= half_h)  # [B, K, S, S]
    circle = np.square(dx) <= np.square(radius) - np.square(dy)

    # Triangle: the vertex angles increase, so the inside is where all three edge functions
    # cross(edge, pixel - vertex) = a * y + b * x + c are >= 0; split into a row and a column part.
    theta = params[..., 6:9]  # [B, K, 3]
    vx = params[..., 1:2] + params[..., 3:4] * np.cos(theta)
    vy = params[..., 2:3] + params[..., 3:4] * np.sin(theta)
    a, b = np.roll(vx, -1, axis=-1) - vx, vy - np.roll(vy, -1, axis=-1)
    c = -(a * vy + b * vx)
    a, b, c = (t[..., None, None] for t in (a, b, c))  # [B, K, 3, 1, 1]
    triangle = ((a * y + c) + b * x).min(axis=2) >= 0

    masks = np.where(kind == RECTANGLE, rectangle, np.where(kind == CIRCLE, circle, triangle))
    masks &= kind != ABSENT
    # Per pixel, the 1-based index of the topmost shape covering it; 0 is the background.
    label = (masks * np.arange(1, MAX_SHAPES + 1).reshape(1, -1, 1, 1)).max(axis=1)  # [B, S, S]
    offsets = np.arange(len(params)).reshape(-1, 1, 1) * (MAX_SHAPES + 1)  # row of image i's palette
    return colours.reshape(-1, 3)[label + offsets].transpose(0, 3, 1, 2)  # [B, 3, S, S]


class Shapes(Dataset[Tensor]):
    """`length` images of shapes; `key` separates training ("shapes", seed) from validation ("shapes-val").

    Training indices come from `EpochSampler` and grow from epoch to epoch, so training never repeats an
    image, while the validation images never change (not even with the seed). `__getitems__` lets the
    DataLoader draw a whole batch in one vectorised call.
    """

    channels = 3

    def __init__(self, crop_size: int, length: int, key: tuple[object, ...]) -> None:
        self.crop_size = crop_size
        self.length = length
        self.key = key

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        drawn = [shape_params(self.crop_size, item_rng(*self.key, index)) for index in indices]
        params = np.array([rows for rows, _ in drawn], dtype=np.float32)
        colours = np.array([colours for _, colours in drawn], dtype=np.uint8)
        images = render(params, colours, self.crop_size).astype(np.float32) / np.float32(255)
        return list(torch.from_numpy(images).unbind(0))

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])[0]


def build_shapes(crop_size: int, train_samples: int, val_samples: int, seed: int) -> tuple[Shapes, Shapes]:
    return Shapes(crop_size, train_samples, ("shapes", seed)), Shapes(crop_size, val_samples, ("shapes-val",))
