"""Config -> datasets: the one place where data config keys become constructor arguments."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Config, ConfigError, DatasetSplitConfig
from .coco import CocoDetection
from .loader import create_test_loader, create_train_loader
from .shapes import ensure_shapes_dataset
from .transforms import DetectionTransform


def resolve_data_paths(cfg: Config) -> Config:
    """With `data.synthetic.enabled`, generate the shapes dataset if needed (a no-op when it is
    already on disk) and return a config whose data.train/val paths point at it; otherwise
    return `cfg` unchanged. Call it on one process at a time (rank 0, then a barrier)."""
    synthetic = cfg.data.synthetic
    if not synthetic.enabled:
        return cfg
    generated = ensure_shapes_dataset(
        synthetic.root,
        num_train=synthetic.num_train,
        num_val=synthetic.num_val,
        image_size=synthetic.image_size,
        seed=synthetic.seed,
    )
    splits = {
        "train": DatasetSplitConfig(
            str(generated.train_image_dir), str(generated.train_annotation_file)
        ),
        "val": DatasetSplitConfig(str(generated.val_image_dir), str(generated.val_annotation_file)),
    }
    for split, paths in splits.items():
        given = getattr(cfg.data, split)
        # Empty, or already resolved (a config saved by a previous run): anything else is a
        # second dataset that the generator would silently replace.
        if (given.image_dir or given.annotation_file) and given != paths:
            raise ConfigError(
                f"data.synthetic.enabled is true, so data.{split} comes from the generator "
                f"({paths.image_dir}); leave data.{split}.image_dir/annotation_file empty, or "
                "set data.synthetic.enabled=false to use your own dataset"
            )
    return replace(cfg, data=replace(cfg.data, **splits))


def build_transform(cfg: Config, training: bool) -> DetectionTransform:
    """Training augmentation (multi-scale resize, flip, optional colour jitter) or the
    deterministic test-time resize, from the input.* keys."""
    if training:
        return DetectionTransform(
            min_size=cfg.input.min_size,
            max_size=cfg.input.max_size,
            flip_prob=cfg.input.flip_prob,
            photometric_prob=0.5 if cfg.input.color_jitter else 0.0,
        )
    return DetectionTransform(min_size=cfg.input.test_min_size, max_size=cfg.input.test_max_size)


def build_dataset(cfg: Config, split: str, training: bool) -> CocoDetection:
    """split: "train" or "val"; training selects the augmentation (and filter_empty)."""
    paths: DatasetSplitConfig = getattr(cfg.data, split)
    if not paths.image_dir or not paths.annotation_file:
        raise ConfigError(
            f"data.{split}.image_dir and data.{split}.annotation_file must be set "
            f"(got {paths.image_dir!r}, {paths.annotation_file!r})"
        )
    return CocoDetection(
        paths.image_dir,
        paths.annotation_file,
        transform=build_transform(cfg, training),
        filter_empty=cfg.data.filter_empty and training,
        on_bad_image=cfg.data.on_bad_image if training else "stop",
    )


def build_train_loader(
    cfg: Config,
    dataset: CocoDetection,
    start_iter: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
) -> DataLoader:
    """The infinite, seeded training stream of `dataset` from iteration `start_iter`: this
    rank's share of train.batch_size, data.num_workers, train.seed, grouping and padding as
    configured; pinned memory when feeding a CUDA `device`."""
    return create_train_loader(
        dataset,
        batch_size=cfg.train.batch_size // world_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.train.seed,
        start_iter=start_iter,
        rank=rank,
        world_size=world_size,
        aspect_ratio_grouping=cfg.data.aspect_ratio_grouping,
        size_divisibility=cfg.input.size_divisibility,
        pin_memory=device is not None and device.type == "cuda",
    )


def build_test_loader(
    cfg: Config, dataset: Dataset, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Every image of `dataset` (any dataset of test-time items, e.g. a Subset) once, in order
    (this rank's contiguous shard), eval.batch_size at a time, padded as configured."""
    return create_test_loader(
        dataset,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        rank=rank,
        world_size=world_size,
        size_divisibility=cfg.input.size_divisibility,
    )
