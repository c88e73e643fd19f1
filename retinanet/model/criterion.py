"""Training targets and loss of RetinaNet, batched over the images of a batch.

loss_cls: focal loss summed over all non-ignored anchors and all classes;
loss_box: box regression loss summed over foreground anchors;
both divided by the same normaliser, the number of foreground anchors (paper, Sec. 3.3: "the
total focal loss of an image is computed as the sum of the focal loss over all ~100k anchors,
normalized by the number of anchors assigned to a ground-truth box").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..choices import check_choice, check_range
from .box_coding import BoxCoder
from .losses import (
    ALPHA_RANGE,
    LABEL_SMOOTHING_RANGE,
    GammaSchedule,
    ModulatingFactor,
    PowerFactor,
    dense_focal_loss,
    giou_loss,
    resolve_alpha,
    resolve_factor,
    smooth_l1_loss,
)
from .matcher import BACKGROUND, AnchorMatcher, pad_boxes

BoxLossKind = Literal["smooth_l1", "giou"]
Normalizer = Literal["num_foreground", "ema"]


class RetinaNetCriterion(nn.Module):
    """Args:
    matcher: assigns anchors to ground truth.
    box_coder: encodes regression targets.
    alpha: class-balancing weight of positives (0.25); None disables it. A GammaSchedule with
        an alpha_start ramps alpha to this value.
    modulation: the focal term f(p_t): a ModulatingFactor (PowerFactor(2) by default) or a
        GammaSchedule evaluated at the training progress passed to forward.
    label_smoothing: eps of binary label smoothing of the class targets (cross-entropy only;
        see `dense_focal_loss`); 0 is off.
    box_loss: "smooth_l1" (with `smooth_l1_beta`; 0 is L1) or "giou" (on decoded boxes).
    box_loss_weight: multiplier of loss_box.
    normalizer: "num_foreground" (the paper: foreground anchors in the batch, at least 1) or
        "ema" (Detectron2: an exponential moving average of that count, momentum
        `ema_momentum`, starting at `ema_initial`, which damps the noise of batches with few
        objects).
    """

    def __init__(
        self,
        matcher: AnchorMatcher,
        box_coder: BoxCoder,
        alpha: float | None = 0.25,
        modulation: ModulatingFactor | GammaSchedule | None = None,
        label_smoothing: float = 0.0,
        box_loss: BoxLossKind = "smooth_l1",
        smooth_l1_beta: float = 0.0,
        box_loss_weight: float = 1.0,
        normalizer: Normalizer = "num_foreground",
        ema_momentum: float = 0.9,
        ema_initial: float = 100.0,
    ) -> None:
        super().__init__()
        check_choice(box_loss, BoxLossKind, "box_loss")
        check_choice(normalizer, Normalizer, "normalizer")
        if alpha is not None:
            check_range(alpha, ALPHA_RANGE, "focal loss alpha")
        self.matcher = matcher
        self.box_coder = box_coder
        self.alpha = alpha
        self.modulation = modulation if modulation is not None else PowerFactor(2.0)
        check_range(label_smoothing, LABEL_SMOOTHING_RANGE, "label_smoothing")
        self.label_smoothing = label_smoothing
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.box_loss_weight = box_loss_weight
        self.normalizer = normalizer
        self.ema_momentum = ema_momentum
        # Part of the state dict so that a resumed run continues the same average.
        self.register_buffer("foreground_ema", torch.tensor(float(ema_initial)))

    def match(
        self, anchors: Tensor, targets: Sequence[dict[str, Tensor]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns matches (B, A) (index into the padded boxes, BACKGROUND or IGNORE),
        anchor_classes (B, A) (ground-truth class of foreground anchors, BACKGROUND or IGNORE)
        and the padded ground-truth boxes (B, M, 4)."""
        device = anchors.device
        gt_boxes = pad_boxes([t["boxes"] for t in targets], device)
        # Targets may lack crowd boxes (or hold None); build an empty tensor only for those, and
        # only when some image has crowd regions: this runs on every training step.
        crowd = [t.get("crowd_boxes") for t in targets]
        crowd_boxes = None
        if any(c is not None and len(c) for c in crowd):
            empty = torch.zeros(0, 4)
            crowd_boxes = pad_boxes([empty if c is None else c for c in crowd], device)
        matches = self.matcher(anchors, gt_boxes, crowd_boxes)
        gt_labels = torch.full(gt_boxes.shape[:2], BACKGROUND, dtype=torch.int64, device=device)
        for i, t in enumerate(targets):  # a loop over images to pad labels, not over anchors
            gt_labels[i, : len(t["labels"])] = t["labels"].to(device)
        classes = gt_labels.gather(1, matches.clamp(min=0))
        anchor_classes = torch.where(matches >= 0, classes, matches)
        return matches, anchor_classes, gt_boxes

    def forward(
        self,
        cls_logits: Tensor,
        box_deltas: Tensor,
        anchors: Tensor,
        targets: Sequence[dict[str, Tensor]],
        progress: float = 0.0,
    ) -> dict[str, Tensor]:
        """cls_logits (B, A, K), box_deltas (B, A, 4), anchors (A, 4); targets: per image
        `boxes` (n, 4) xyxy input pixels, `labels` (n,), optional `crowd_boxes` (c, 4);
        progress: fraction of training done (for gamma schedules).
        Returns loss_cls, loss_box (normalised) and num_foreground (per image, for logging)."""
        matches, anchor_classes, gt_boxes = self.match(anchors, targets)
        foreground = matches >= 0
        num_foreground = foreground.sum().float()
        normalizer = self._normalizer(num_foreground)

        factor = resolve_factor(self.modulation, progress)
        alpha = resolve_alpha(self.modulation, self.alpha, progress)
        loss_cls = dense_focal_loss(cls_logits, anchor_classes, alpha, factor, self.label_smoothing)
        loss_cls = loss_cls / normalizer

        # The box loss is evaluated for every anchor and masked to the foreground ones:
        # gathering the foreground anchors first would need their count on the host (a
        # device sync per step), and (B, A, 4) is small next to the (B, A, K) class logits.
        # Other anchors get their own box as target, which keeps every term finite.
        matched_boxes = gt_boxes.gather(1, matches.clamp(min=0)[..., None].expand(-1, -1, 4))
        matched_boxes = torch.where(foreground[..., None], matched_boxes, anchors)  # (B, A, 4)
        if self.box_loss == "smooth_l1":
            target_deltas = self.box_coder.encode(anchors, matched_boxes)
            per_anchor = smooth_l1_loss(
                box_deltas, target_deltas, self.smooth_l1_beta, reduction="none"
            ).sum(dim=-1)
        else:
            decoded = self.box_coder.decode(box_deltas.float(), anchors)
            per_anchor = giou_loss(decoded, matched_boxes, reduction="none")
        loss_box = torch.dot(per_anchor.flatten(), foreground.flatten().to(per_anchor.dtype))
        loss_box = self.box_loss_weight * loss_box / normalizer
        return {
            "loss_cls": loss_cls,
            "loss_box": loss_box,
            "num_foreground": num_foreground.detach() / max(1, len(targets)),
        }

    def _normalizer(self, num_foreground: Tensor) -> Tensor:
        count = num_foreground.detach()
        # Under DistributedDataParallel, the mean foreground count of all processes: after DDP
        # averages gradients the loss is the sum over the global batch divided by its total
        # foreground count, as on one GPU.
        if dist.is_available() and dist.is_initialized():
            count = count.clone()
            dist.all_reduce(count)
            count /= dist.get_world_size()
        if self.normalizer == "ema":
            if self.training:
                m = self.ema_momentum
                self.foreground_ema.mul_(m).add_((1 - m) * count.clamp(min=1))
            return self.foreground_ema.clone()
        return count.clamp(min=1)
