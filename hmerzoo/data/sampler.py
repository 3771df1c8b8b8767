"""Epoch order of pre-built buckets: seeded, resumable mid-epoch, sharded by whole buckets across ranks."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 mixing): the same parts give the same seed in every process.

    Used instead of ``hash()`` (salted per process for strings) and instead of global RNG state (differs between
    DataLoader workers), so orders and augmentations depend only on the numbers passed in.
    """
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1  # torch.Generator.manual_seed wants a value that fits in int64


def seeded_generator(*parts: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(derive_seed(*parts))
    return generator


# Tags that keep the random streams of different uses apart for the same user seed.
TAG_SAMPLER = 1
TAG_AUGMENT = 2
TAG_HOLDOUT = 3
TAG_TRAIN_LIMIT = 4
TAG_VAL_LIMIT = 5


class BucketSampler(Sampler[int]):
    """Yields bucket indices for one epoch on one rank.

    The epoch order is a permutation drawn from (seed, epoch) alone, so it is the same on resume and whatever the
    number of workers. With ``world_size`` W, the epoch order is padded by wrapping around to a multiple of W and
    rank r takes positions r, r+W, r+2W, ...: every rank gets the same number of whole buckets.
    ``set_start(i)`` skips the first i buckets of this rank's epoch (resume mid-epoch); ``set_epoch`` clears it.
    """

    def __init__(self, num_buckets: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_buckets < 0:
            raise ValueError(f"BucketSampler: num_buckets must be >= 0, got {num_buckets}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"BucketSampler: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_buckets = num_buckets
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, index: int) -> None:
        """Skip the first ``index`` buckets of this rank's current epoch (the number already consumed)."""
        if not 0 <= index <= self.buckets_per_rank:
            raise ValueError(f"BucketSampler.set_start: index {index} is outside [0, {self.buckets_per_rank}] "
                             "(the number of buckets per epoch on this rank)")
        self.start = int(index)

    @property
    def buckets_per_rank(self) -> int:
        """Buckets a rank sees in a whole epoch (ceil(num_buckets / world_size))."""
        return -(-self.num_buckets // self.world_size)

    def epoch_order(self, epoch: int | None = None) -> list[int]:
        """This rank's bucket indices for ``epoch`` (default: the current one), before ``set_start`` skipping."""
        epoch = self.epoch if epoch is None else epoch
        if self.num_buckets == 0:
            return []
        if self.shuffle:
            order = torch.randperm(self.num_buckets, generator=seeded_generator(self.seed, TAG_SAMPLER, epoch)).tolist()
        else:
            order = list(range(self.num_buckets))
        total = self.buckets_per_rank * self.world_size
        padded = [order[i % self.num_buckets] for i in range(total)]  # wrap around; may wrap more than once
        return padded[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.start:])

    def __len__(self) -> int:
        """Buckets the next iteration yields (the epoch on this rank minus those skipped by ``set_start``)."""
        return self.buckets_per_rank - self.start

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state.get("seed", self.seed))
        self.set_epoch(int(state["epoch"]))
        self.set_start(int(state.get("start", 0)))


class EpochTaggedSampler(Sampler[tuple[int, int]]):
    """Wraps a BucketSampler and yields (epoch, bucket index) pairs.

    The dataset seeds its augmentation from (seed, epoch, bucket). Persistent DataLoader workers hold an old copy
    of the dataset, so the epoch travels with each index instead of being set on the dataset.
    """

    def __init__(self, bucket_sampler: BucketSampler):
        self.bucket_sampler = bucket_sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.bucket_sampler.epoch
        for bucket in self.bucket_sampler:
            yield epoch, bucket

    def __len__(self) -> int:
        return len(self.bucket_sampler)
