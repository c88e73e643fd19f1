"""Samplers: the infinite, seeded training stream of (index, seed) pairs, its batching (optionally
grouped by image orientation) with exact resume, and the sharded inference order.

The training stream is a pure function of (num_samples, seed): epoch e is the permutation drawn
from `numpy.random.default_rng([seed, e])`, followed by one augmentation seed per position drawn
from the same generator. Rank r of a world of size W takes global positions r, r + W, r + 2W, ...
Because nothing depends on wall-clock state, a run restarted at iteration k regenerates the stream
and yields exactly the batches an uninterrupted run would have yielded from iteration k on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def epoch_order(num_samples: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Dataset indices (N,) int64 in the order of epoch `epoch`, and the augmentation seed (N,)
    int64 of each position."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_samples), rng.integers(0, 2**31, size=num_samples)


def training_stream(
    num_samples: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0
) -> Iterator[tuple[int, int]]:
    """Infinite stream of (index, augmentation seed) for `rank`, beginning at its `start`-th
    item (item j of rank r is global stream position r + world_size * j)."""
    _check_shard(rank, world_size)
    if num_samples < 1:
        raise ValueError(f"cannot sample from an empty dataset ({num_samples=})")
    if seed < 0 or start < 0:
        raise ValueError(f"seed and start must be non-negative, got {seed=}, {start=}")
    position = rank + world_size * start
    epoch, first = divmod(position, num_samples)
    while True:
        indices, seeds = epoch_order(num_samples, seed, epoch)
        yield from zip(
            indices[first::world_size].tolist(), seeds[first::world_size].tolist(), strict=True
        )
        epoch += 1
        # First position of the next epoch that belongs to this rank.
        first = (rank - epoch * num_samples) % world_size


def orientation_groups(aspect_ratios: np.ndarray) -> np.ndarray:
    """(N,) int64 group of each image: 1 if width >= height, else 0; aspect_ratios = w / h."""
    return (np.asarray(aspect_ratios) >= 1.0).astype(np.int64)


@dataclasses.dataclass(eq=False)  # compared and hashed by identity, like any sampler
class TrainingBatchSampler(Sampler[list[tuple[int, int]]]):
    """Infinite batches of (index, seed) pairs from `training_stream`, beginning at `start_iter`.

    With `group_ids` (N,) (e.g. `orientation_groups`), each group fills its own bucket in stream
    order and a batch is yielded when a bucket is full, so that a batch never mixes groups and
    padding stays small. Resuming then replays the stream from its start and discards the first
    `start_iter` batches (pure index arithmetic: well under a second per million samples); without
    groups it jumps straight to sample `start_iter * batch_size`.
    """

    num_samples: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    start_iter: int = 0
    group_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        batch_size, start_iter = self.batch_size, self.start_iter
        if batch_size < 1 or start_iter < 0:
            raise ValueError(
                f"need batch_size >= 1 and start_iter >= 0, got {batch_size=}, {start_iter=}"
            )
        if self.group_ids is not None and len(self.group_ids) != self.num_samples:
            raise ValueError(f"{len(self.group_ids)} group ids for {self.num_samples} samples")
        _check_shard(self.rank, self.world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.group_ids is None:
            stream = self._stream(start=self.start_iter * self.batch_size)
            while True:
                yield [next(stream) for _ in range(self.batch_size)]
        batches = self._grouped_batches()
        for _ in range(self.start_iter):
            next(batches)
        yield from batches

    def _stream(self, start: int = 0) -> Iterator[tuple[int, int]]:
        return training_stream(self.num_samples, self.seed, self.rank, self.world_size, start)

    def _grouped_batches(self) -> Iterator[list[tuple[int, int]]]:
        group_of = np.asarray(self.group_ids).tolist()  # Python ints: the fastest lookup
        buckets: dict[int, list[tuple[int, int]]] = {}
        for item in self._stream():
            bucket = buckets.setdefault(group_of[item[0]], [])
            bucket.append(item)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()


class InferenceSampler(Sampler[int]):
    """Rank r's contiguous share [N r / W, N (r + 1) / W) of the indices 0..N-1, in order: the
    shards are disjoint and cover every index exactly once (no padding duplicates), so an
    evaluation gathered over ranks sees each image once."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        _check_shard(rank, world_size)
        self.begin = num_samples * rank // world_size
        self.end = num_samples * (rank + 1) // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


def _check_shard(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got {rank=}, {world_size=}")
