"""Normalisation layers chosen by name in the configs."""

from __future__ import annotations

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

NORMS = ("frozen_bn", "bn", "sync_bn", "gn")


def make_norm(name: str, channels: int, eps: float = 1e-5, gn_groups: int = 32) -> nn.Module:
    """A normalisation layer over `channels` feature channels.

    frozen_bn: BatchNorm with fixed statistics and affine parameters (fine-tuning from ImageNet
        with small per-GPU batches, where batch statistics are too noisy to learn);
    bn: ordinary BatchNorm; sync_bn: BatchNorm with statistics shared across DDP processes;
    gn: GroupNorm (batch-size independent; the usual choice when training from scratch).
    """
    if name == "frozen_bn":
        return FrozenBatchNorm2d(channels, eps=eps)
    if name == "bn":
        return nn.BatchNorm2d(channels, eps=eps)
    if name == "sync_bn":
        return nn.SyncBatchNorm(channels, eps=eps)
    if name == "gn":
        groups = min(gn_groups, channels)
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels, eps=eps)
    raise ValueError(f"unknown norm {name!r}; expected one of {', '.join(NORMS)}")
