"""RetinaNet: a ResNet-FPN backbone, anchors on P3-P7, a class subnet and a box subnet, trained
with the focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .anchors import AnchorGenerator
from .backbone import ResNetBackbone
from .criterion import RetinaNetCriterion
from .fpn import FeaturePyramid
from .head import HeadOutputs, RetinaNetHead
from .norm import fold_norms_into_convs
from .postprocess import DetectionPostprocessor


class RetinaNet(nn.Module):
    """The detector. Images come in as a padded batch of RGB pixels in 0-255 units (uint8 or
    float), with the size of each image before padding; normalisation happens here, on the
    model's device.

    forward(images, image_sizes) -> HeadOutputs; losses(outputs, targets) -> dict of loss terms;
    detect(outputs, image_sizes, original_sizes) -> detections per image.

    Args:
        backbone, fpn, head, anchor_generator, criterion, postprocessor: the parts.
        pixel_mean, pixel_std: per-channel RGB normalisation in 0-255 units.
    """

    def __init__(
        self,
        backbone: ResNetBackbone,
        fpn: FeaturePyramid,
        head: RetinaNetHead,
        anchor_generator: AnchorGenerator,
        criterion: RetinaNetCriterion,
        postprocessor: DetectionPostprocessor,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        self.head = head
        self.anchor_generator = anchor_generator
        self.criterion = criterion
        self.postprocessor = postprocessor
        self.channels_last = False
        for name, value in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
            self.register_buffer(
                name, torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1), False
            )

    def use_channels_last(self, enabled: bool = True) -> RetinaNet:
        """Store convolution weights and feature maps channels-last (NHWC): faster convolutions
        on CPUs with oneDNN and on tensor cores."""
        self.channels_last = enabled
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def fold_norms(self) -> RetinaNet:
        """For inference only: put the model in eval mode and fold the backbone's BatchNorms
        (frozen or trainable: in eval mode their statistics are fixed) into the convolutions
        before them (see `fold_norms_into_convs`). Detections equal the unfolded model's up to
        float rounding; the model must not be trained afterwards."""
        fold_norms_into_convs(self.eval().backbone)
        return self

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def normalize(self, images: Tensor, image_sizes: Tensor) -> Tensor:
        """(B, 3, H, W) 0-255 pixels -> normalised float; padding set to 0 after normalisation
        (the mean colour), as if the images had been normalised before padding."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        height, width = x.shape[-2:]
        sizes = image_sizes.to(x.device)
        # Masked unconditionally: testing whether any image is padded would cost a device sync.
        rows = torch.arange(height, device=x.device)[None, :, None] < sizes[:, 0, None, None]
        cols = torch.arange(width, device=x.device)[None, None, :] < sizes[:, 1, None, None]
        return x.mul_((rows & cols)[:, None])

    def forward(self, images: Tensor, image_sizes: Tensor) -> HeadOutputs:
        """images: (B, 3, H, W) padded, 0-255 RGB; image_sizes: (B, 2) (H, W) before padding."""
        x = self.normalize(images, image_sizes)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.fpn(self.backbone(x))
        cls_logits, box_deltas = self.head(features)
        # fp32 outputs even under autocast: the loss needs them in fp32 anyway, and bf16 would
        # round decoded coordinates to 4-8 px at COCO image sizes and tie many scores.
        cls_logits, box_deltas = cls_logits.float(), box_deltas.float()
        feature_sizes = [tuple(f.shape[-2:]) for f in features]
        anchors = self.anchor_generator(tuple(images.shape[-2:]), feature_sizes, images.device)
        num_anchors_per_level = self.anchor_generator.num_anchors_per_level(feature_sizes)
        return HeadOutputs(cls_logits, box_deltas, anchors, num_anchors_per_level)

    def losses(
        self, outputs: HeadOutputs, targets: Sequence[dict[str, Tensor]], progress: float = 0.0
    ) -> dict[str, Tensor]:
        """targets: per image `boxes` (n, 4) xyxy in input (resized) pixels, `labels` (n,) in
        [0, K), optional `crowd_boxes` (c, 4). progress: fraction of training done."""
        return self.criterion(
            outputs.cls_logits, outputs.box_deltas, outputs.anchors, targets, progress
        )

    def detect(
        self, outputs: HeadOutputs, image_sizes: Tensor, original_sizes: Tensor
    ) -> list[dict[str, Tensor]]:
        """Detections per image with boxes in original-image pixels (see DetectionPostprocessor)."""
        return self.postprocessor(outputs, image_sizes, original_sizes)

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: Tensor, original_sizes: Tensor | None = None):
        """forward + detect in one call; original_sizes defaults to image_sizes."""
        original_sizes = image_sizes if original_sizes is None else original_sizes
        return self.detect(self(images, image_sizes), image_sizes, original_sizes)
