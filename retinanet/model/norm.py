"""Normalisation layers chosen by name in the configs."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBatchNorm2d

NORMS = ("frozen_bn", "bn", "sync_bn", "gn")


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
    """GroupNorm that returns a channels-last output for a channels-last input on every device.

    The CPU kernel keeps the layout; the CUDA kernel of most PyTorch releases returns a
    contiguous (NCHW) tensor, so every GroupNorm in a channels-last network would add two
    layout conversions around the next convolution. For such inputs this computes the
    statistics on the NHWC view itself (in fp32, output in the input's dtype)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" or x.dim() != 4 or x.is_contiguous():
            return super().forward(x)
        if not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        return self.forward_channels_last(x)

    def forward_channels_last(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) stored channels-last -> the same shape and layout, dtype of x."""
        n, c, h, w = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            grouped = x.permute(0, 2, 3, 1).reshape(n, h * w, self.num_groups, c // self.num_groups)
            grouped = grouped.float()
            var, mean = torch.var_mean(grouped, dim=(1, 3), keepdim=True, correction=0)
            y = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape(n, h, w, c)
            if self.affine:
                y = torch.addcmul(self.bias.float(), y, self.weight.float())
            return y.to(x.dtype).permute(0, 3, 1, 2)


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
        return GroupNorm(groups, channels, eps=eps)
    raise ValueError(f"unknown norm {name!r}; expected one of {', '.join(NORMS)}")
