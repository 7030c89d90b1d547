"""Which sample each rank reads, in which order, and a DataLoader that resumes mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from dvae.data.transforms import stable_seed
from dvae.errors import ConfigError


class EpochSampler(Sampler[int]):
    """Yields this rank's share of `epoch * n + permutation(n)`: a fresh seeded order each epoch, and a
    distinct index per draw so index-keyed random crops differ between epochs.

    Every rank computes the same permutation and takes every `world_size`-th index from position `rank`
    (after dropping a tail shorter than `world_size`), so the ranks see disjoint samples in equal numbers.
    Lightning calls `set_epoch` before every epoch (also after resuming); a plain loop that never calls it
    still gets a new epoch on each pass. `skip` drops the first indices of the next pass: resuming inside
    an epoch (see `ResumableLoader`).
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size}).")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def __iter__(self) -> Iterator[int]:
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        generator = torch.Generator().manual_seed(stable_seed("epoch-order", self.seed, epoch))
        order = torch.randperm(self.num_samples, generator=generator) + epoch * self.num_samples
        share = order[self.rank : len(self) * self.world_size : self.world_size]
        return iter(share[skip:].tolist())


class RankShard(Sampler[int]):
    """Indices rank, rank + world_size, ... of a fixed set, without padding: over all ranks each index
    comes exactly once (torch's DistributedSampler pads with repeats, which would count some validation
    images twice)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, num_samples, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class ResumableLoader(DataLoader):
    """A DataLoader over an `EpochSampler` that Lightning can checkpoint and resume inside an epoch.

    `state_dict()` is (epoch, batches handed out in it), counted as the training loop receives them
    (not as workers prefetch); `load_state_dict` makes the next pass start right after those batches.
    Lightning saves and restores this state in its checkpoints (the `_Stateful` protocol).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSampler) or not self.drop_last:
            raise TypeError("ResumableLoader needs an EpochSampler and drop_last=True.")
        self._epoch = 0
        self._batches = 0
        self._resume_batches = 0

    def __iter__(self):
        self._epoch = self.sampler.epoch
        self._batches, self._resume_batches = self._resume_batches, 0
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches, "batch_size": self.batch_size,
                "world_size": self.sampler.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["batch_size"], state["world_size"]) != (self.batch_size, self.sampler.world_size):
            raise ConfigError(
                f"the checkpoint was taken with {state['world_size']} processes of {state['batch_size']} images; "
                f"this run has {self.sampler.world_size} of {self.batch_size}: resume with the same "
                "trainer.devices, trainer.num_nodes and data.batch_size."
            )
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip = state["batches"] * self.batch_size
        self._resume_batches = state["batches"]
