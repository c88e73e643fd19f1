"""DataLoaders for training (infinite, seeded, resumable) and evaluation (sharded, each image
once)."""

from __future__ import annotations

import functools
import signal

import cv2
import torch
from torch.utils.data import DataLoader

from retinanet.data.coco import CocoDetection
from retinanet.data.collate import collate_detection
from retinanet.data.sampler import InferenceSampler, TrainingBatchSampler, orientation_groups


def init_worker(worker_id: int) -> None:
    """Keep each loader worker to one thread: OpenCV and torch would otherwise each start a
    thread per core in every worker and fight the training process for the CPU. Workers ignore
    Ctrl-C (SIGINT, which a terminal sends to every process of the job): the training process
    finishes its step and writes a checkpoint first. SIGTERM keeps its default, since that is
    how the training process ends its workers when it exits."""
    cv2.setNumThreads(0)
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def create_train_loader(
    dataset: CocoDetection,
    batch_size: int,
    num_workers: int,
    seed: int,
    start_iter: int = 0,
    rank: int = 0,
    world_size: int = 1,
    aspect_ratio_grouping: bool = True,
    size_divisibility: int = 128,
    pin_memory: bool = True,
) -> DataLoader:
    """Infinite loader of `Batch`es of `batch_size` images (per rank) whose augmentation is fixed
    by `seed`; iterating it after a restart with `start_iter=k` yields the batches k, k+1, ... of
    the uninterrupted run."""
    groups = orientation_groups(dataset.aspect_ratios) if aspect_ratio_grouping else None
    batch_sampler = TrainingBatchSampler(
        len(dataset),
        batch_size,
        seed,
        rank=rank,
        world_size=world_size,
        start_iter=start_iter,
        group_ids=groups,
    )
    return _loader(dataset, batch_sampler, num_workers, size_divisibility, pin_memory)


def create_test_loader(
    dataset: CocoDetection,
    batch_size: int = 1,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    size_divisibility: int = 128,
    pin_memory: bool = True,
) -> DataLoader:
    """Loader over rank's contiguous shard of the dataset, in order, each image exactly once,
    with the deterministic (test-time) transform."""
    sampler = InferenceSampler(len(dataset), rank, world_size)
    batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
    return _loader(dataset, batch_sampler, num_workers, size_divisibility, pin_memory)


def _loader(
    dataset: CocoDetection,
    batch_sampler: torch.utils.data.Sampler,
    num_workers: int,
    size_divisibility: int,
    pin_memory: bool,
) -> DataLoader:
    # Unreadable images arrive as marked batches, not as exceptions wrapped in worker tracebacks.
    dataset.bad_images_as_items = True
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=functools.partial(collate_detection, size_divisibility=size_divisibility),
        # Pinning needs an accelerator; asking for it without one only produces a warning.
        pin_memory=pin_memory and torch.cuda.is_available(),
        worker_init_fn=init_worker,
        persistent_workers=num_workers > 0,
    )
