import itertools

import numpy as np
import pytest

from retinanet.data.sampler import (
    InferenceSampler,
    TrainingBatchSampler,
    epoch_order,
    orientation_groups,
    training_stream,
)


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_stream_follows_the_documented_epoch_permutations():
    n, seed = 7, 5
    items = _take(training_stream(n, seed), 3 * n)
    for epoch in range(3):
        expected = np.random.default_rng([seed, epoch]).permutation(n)
        chunk = items[epoch * n : (epoch + 1) * n]
        assert [index for index, _ in chunk] == expected.tolist()
    # augmentation seeds differ across epochs for the same image
    first_epoch = dict(items[:n])
    second_epoch = dict(items[n : 2 * n])
    assert all(first_epoch[i] != second_epoch[i] for i in range(n))


def test_ddp_shards_interleave_into_the_global_stream():
    n, seed, world = 10, 1, 3
    global_items = _take(training_stream(n, seed), 60)
    shards = [_take(training_stream(n, seed, rank, world), 20) for rank in range(world)]
    for rank, shard in enumerate(shards):
        assert shard == global_items[rank::world]
    # within each epoch, the ranks' items are disjoint and cover the dataset
    for epoch in range(6):
        positions = range(epoch * n, (epoch + 1) * n)
        indices = [global_items[p][0] for p in positions]
        assert sorted(indices) == list(range(n))


def test_stream_start_skips_exactly():
    n, seed, world = 9, 2, 2
    full = _take(training_stream(n, seed, 1, world), 40)
    for start in (0, 4, 5, 13, 22):
        assert _take(training_stream(n, seed, 1, world, start=start), 40 - start) == full[start:]


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("world_size", [1, 2])
def test_batch_sampler_resume_equals_uninterrupted_tail(grouped, world_size):
    n, batch_size = 11, 3  # batches straddle epoch boundaries
    groups = orientation_groups(np.random.default_rng(0).uniform(0.5, 2.0, n)) if grouped else None
    for rank in range(world_size):

        def batches(start_iter, rank=rank):
            sampler = TrainingBatchSampler(
                n,
                batch_size,
                seed=3,
                rank=rank,
                world_size=world_size,
                start_iter=start_iter,
                group_ids=groups,
            )
            return _take(iter(sampler), 30 - start_iter)

        uninterrupted = batches(0)
        for k in (1, 7, 19):
            assert batches(k) == uninterrupted[k:]


def test_aspect_grouping_never_mixes_orientations_and_loses_nothing():
    aspect_ratios = np.array([1.5, 0.7, 1.0, 0.5, 2.0, 0.9, 1.3, 0.8, 1.1, 0.6, 1.7, 0.75, 1.2])
    groups = orientation_groups(aspect_ratios)
    assert groups.tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]  # w == h counts as w >= h
    sampler = TrainingBatchSampler(len(groups), 4, seed=0, group_ids=groups)
    batches = _take(iter(sampler), 50)
    for batch in batches:
        assert len(batch) == 4
        assert len({groups[index] for index, _ in batch}) == 1
    # every item of the stream ends up in a batch, in stream order within its group
    stream = _take(training_stream(len(groups), 0), 200)
    emitted = [item for batch in batches for item in batch]
    for group in (0, 1):
        from_group = [item for item in emitted if groups[item[0]] == group]
        stream_group = [item for item in stream if groups[item[0]] == group]
        assert from_group == stream_group[: len(from_group)]


def test_epoch_order_is_a_permutation():
    indices, seeds = epoch_order(100, 7, 3)
    assert sorted(indices.tolist()) == list(range(100))
    assert seeds.min() >= 0 and len(set(seeds.tolist())) > 90


@pytest.mark.parametrize(("n", "world"), [(10, 3), (2, 4), (12, 1), (7, 7)])
def test_inference_shards_are_contiguous_disjoint_and_covering(n, world):
    shards = [list(InferenceSampler(n, rank, world)) for rank in range(world)]
    assert [i for shard in shards for i in shard] == list(range(n))
    assert [len(InferenceSampler(n, rank, world)) for rank in range(world)] == [
        len(s) for s in shards
    ]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        InferenceSampler(5, rank=2, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        next(training_stream(0, 0))
    with pytest.raises(ValueError, match="group ids"):
        TrainingBatchSampler(5, 2, 0, group_ids=np.zeros(4))
