"""ResNet backbone (torchvision's ResNet-18/34/50/101/152) returning C3, C4, C5."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import resnet as resnet_models

from ..choices import check_choice
from .norm import NormKind, make_norm

ResNetDepth = Literal[18, 34, 50, 101, 152]


def load_imagenet_state_dict(depth: int, weights: str) -> dict[str, Tensor]:
    """weights: "imagenet" (torchvision's download) or a path to a local state dict (the same
    file torchvision downloads, or any ResNet checkpoint with torchvision's key names)."""
    if weights == "imagenet":
        # V1: the weights the paper-era recipes used; downloaded to the torch hub cache once.
        enum = getattr(torchvision.models, f"ResNet{depth}_Weights")
        return enum.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
    path = Path(os.path.expanduser(weights))  # os.path leaves an unknown ~user as it is
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"cannot read backbone weights from {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


class ResNetBackbone(nn.Module):
    """torchvision ResNet without its classifier, returning the outputs of stages res3-res5.

    Args:
        depth: 18, 34, 50, 101 or 152.
        norm: "frozen_bn" (default when starting from ImageNet weights), "bn", "sync_bn" or
            "gn" (from scratch).
        norm_eps: epsilon of the normalisation layers (torchvision's COCO RetinaNet used 0.0).
        freeze_at: number of leading stages whose parameters are frozen: 0 none, 1 the stem,
            2 the stem and res2 (the paper's and Detectron's choice when fine-tuning).
        stride_in_1x1: put the stride of each bottleneck in its first 1x1 conv (the original
            MSRA ResNet, used by Detectron2's ImageNet weights) instead of the 3x3 conv
            (torchvision's "ResNet v1.5").
        weights: None (random init), "imagenet" (torchvision download) or a local file path.
        blocks: residual blocks per stage res2-res5, overriding the depth's standard counts
            (e.g. (2, 2, 2, 2) for ResNet-18); the block type still follows `depth` (basic
            blocks below 50). depth 18 with (1, 1, 1, 1) is ResNet-10: about half of
            ResNet-18's compute, for small from-scratch models. Empty: the standard counts.
    """

    def __init__(
        self,
        depth: ResNetDepth = 50,
        norm: NormKind = "frozen_bn",
        norm_eps: float = 1e-5,
        freeze_at: int = 2,
        stride_in_1x1: bool = False,
        weights: str | None = None,
        blocks: Sequence[int] = (),
    ) -> None:
        super().__init__()
        check_choice(depth, ResNetDepth, "ResNet depth")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in [0, 5], got {freeze_at}")
        if weights and norm == "gn":
            raise ValueError(
                "ImageNet weights are BatchNorm weights; use norm frozen_bn, bn or sync_bn"
            )
        if blocks and (len(blocks) != 4 or min(blocks) < 1):
            raise ValueError(f"blocks must be 4 counts >= 1 (res2-res5), got {list(blocks)}")
        if blocks and weights:
            raise ValueError(
                "ImageNet weights exist only for the standard depths; leave blocks empty"
            )
        norm_layer = lambda c: make_norm(norm, c, eps=norm_eps)  # noqa: E731
        if blocks:
            block = resnet_models.BasicBlock if depth < 50 else resnet_models.Bottleneck
            resnet = resnet_models.ResNet(block, list(blocks), norm_layer=norm_layer)
        else:
            resnet = getattr(torchvision.models, f"resnet{depth}")(
                weights=None, norm_layer=norm_layer
            )
        if weights:
            state = load_imagenet_state_dict(depth, weights)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = resnet.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(
                    f"backbone weights {weights!r} do not fit ResNet-{depth}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        if stride_in_1x1 and depth >= 50:
            for stage in (resnet.layer2, resnet.layer3, resnet.layer4):
                block = stage[0]
                block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)

        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.res2 = resnet.layer1
        self.res3 = resnet.layer2
        self.res4 = resnet.layer3
        self.res5 = resnet.layer4
        expansion = 4 if depth >= 50 else 1
        self.out_channels = [128 * expansion, 256 * expansion, 512 * expansion]
        self.strides = [8, 16, 32]
        for stage in [self.stem, self.res2, self.res3, self.res4, self.res5][:freeze_at]:
            stage.requires_grad_(False)
        self.freeze_at = freeze_at

    def forward(self, images: Tensor) -> list[Tensor]:
        """images: (B, 3, H, W) normalised -> [C3 (B, C, H/8, W/8), C4 (H/16), C5 (H/32)]."""
        c3 = self.res3(self.res2(self.stem(images)))
        c4 = self.res4(c3)
        c5 = self.res5(c4)
        return [c3, c4, c5]

    def train(self, mode: bool = True) -> ResNetBackbone:
        super().train(mode)
        # Frozen stages keep BatchNorm in inference mode: updating running statistics of
        # layers whose weights never change would silently shift their outputs.
        for stage in [self.stem, self.res2, self.res3, self.res4, self.res5][: self.freeze_at]:
            stage.eval()
        return self
