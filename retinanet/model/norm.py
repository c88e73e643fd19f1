"""Normalisation layers chosen by name in the configs."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBatchNorm2d

NormKind = Literal["frozen_bn", "bn", "sync_bn", "gn"]


class FrozenBatchNorm2d(_TorchvisionFrozenBatchNorm2d):
    """BatchNorm with fixed statistics and affine parameters, y = x * scale + shift, computed in
    the dtype of x. torchvision's version multiplies by fp32 buffers, which under bf16/fp16
    autocast promotes every activation of a frozen backbone to fp32: twice the memory traffic,
    and every following convolution casts back. Same buffers and state-dict keys."""

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)


class GroupNorm(nn.GroupNorm):
    """GroupNorm whose output has the input's layout on every device.

    The CPU kernel keeps channels-last; the CUDA kernel of most PyTorch releases returns a
    contiguous (NCHW) tensor, and every following convolution of a channels-last network would
    then run in NCHW or convert back. For such inputs the output is returned channels-last
    (one copy; the kernel itself, its fp32 statistics and its memory use are PyTorch's)."""

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if (
            x.dim() == 4
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            return y.contiguous(memory_format=torch.channels_last)
        return y


def make_norm(name: NormKind, channels: int, eps: float = 1e-5, gn_groups: int = 32) -> nn.Module:
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
        return GroupNorm(groups, channels, eps=eps)
    raise ValueError(f"unknown norm {name!r}; expected one of {get_args(NormKind)}")
