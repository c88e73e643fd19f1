"""Losses: the sigmoid focal loss (with pluggable modulating factors) and the box losses.

Focal loss (paper, eq. 5), for one anchor and one class with logit x, p = sigmoid(x), label t:

    p_t = p if t = 1 else 1 - p,   alpha_t = alpha if t = 1 else 1 - alpha
    FL(p_t) = -alpha_t * f(p_t) * log(p_t),   f(p_t) = (1 - p_t)^gamma   (the modulating factor)

gamma = 0 gives alpha-weighted binary cross-entropy. Everything is computed from logits:
-log(p_t) = softplus(-z) with z = x for positives and z = -x for negatives, which stays finite
for any finite logit, in fp32 whatever the input dtype.

Two implementations of the same formula:
- `sigmoid_focal_loss`: elementwise and readable, autograd does the gradient. The reference.
- `dense_focal_loss`: what training uses. A (B, A, K) logit tensor with 80 classes is tens of
  millions of elements while only ~100 of them are positives, so it evaluates every element as
  a negative in one fused pass that also produces the gradient (one saved tensor instead of the
  half-dozen autograd would keep), then corrects the few positive elements and the ignored
  anchors sparsely. Tests check it against the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..choices import Interval, check_choice, check_range
from .matcher import IGNORE, box_area

# The kinds of modulating factor, one class each below (PowerFactor, ExponentialFactor,
# CosineFactor, GaussianFactor, SampleDependentPowerFactor for FLSD-53).
Modulation = Literal["power", "exponential", "cos", "gaussian", "flsd"]
# How a gamma schedule goes from its start to its end.
GammaShape = Literal["linear", "cosine"]
# Ranges of the loss's parameters (checked by the config and by the classes below).
GAMMA_RANGE = Interval(0.0)
ALPHA_RANGE = Interval(0.0, 1.0)
COS_SCALE_RANGE = Interval(0.0, math.pi / 2, low_open=True)
GAUSSIAN_S_RANGE = Interval(0.0, low_open=True)
LABEL_SMOOTHING_RANGE = Interval(0.0, 1.0, high_open=True)
RAMP_FRACTION_RANGE = Interval(0.0, 1.0, low_open=True)

# --------------------------------------------------------------------------------------------
# Modulating factors f(p_t)
# --------------------------------------------------------------------------------------------


class ModulatingFactor:
    """f(p_t), the factor that down-weights well-classified samples.

    `weights(z)` takes the logit of the true label, z (p_t = sigmoid(z)), and returns
    f(p_t) and h(p_t) = -p_t (1 - p_t) f'(p_t), the two quantities the loss and its gradient
    need: d/dz [-f(p_t) log p_t] = -h(p_t) softplus(-z) - f(p_t) (1 - p_t).
    Subclasses compute both stably from z.
    """

    def weights(self, z: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self, p_t: Tensor) -> Tensor:
        """f(p_t) for probabilities (plots and analysis)."""
        z = torch.logit(p_t.double().clamp(0.0, 1.0))
        return self.weights(z)[0].to(p_t.dtype)


@dataclass(frozen=True)
class PowerFactor(ModulatingFactor):
    """The paper's f(p_t) = (1 - p_t)^gamma; gamma = 0 is plain cross-entropy."""

    gamma: float = 2.0

    def __post_init__(self) -> None:
        check_range(self.gamma, GAMMA_RANGE, "focal loss gamma")

    def weights(self, z: Tensor) -> tuple[Tensor, Tensor]:
        # (1 - p_t)^gamma as exp(-gamma softplus(z)): pow() of a sigmoid that underflows to 0
        # has an infinite derivative for gamma < 1, which autograd turns into a NaN gradient.
        if self.gamma == 0:
            f = torch.ones_like(z)  # also where softplus(z) = inf (p_t = 1 in __call__)
        else:
            f = torch.exp(-self.gamma * F.softplus(z))
        return f, self.gamma * torch.sigmoid(z) * f


@dataclass(frozen=True)
class ExponentialFactor(ModulatingFactor):
    """f(p_t) = exp(-beta * p_t): a bounded alternative that never fully silences a sample
    (f(1) = exp(-beta) instead of 0), for studying how much the shape of f matters."""

    beta: float = 1.0

    def weights(self, z: Tensor) -> tuple[Tensor, Tensor]:
        p = torch.sigmoid(z)
        f = torch.exp(-self.beta * p)
        return f, self.beta * p * torch.sigmoid(-z) * f


@dataclass(frozen=True)
class CosineFactor(ModulatingFactor):
    """f(p_t) = cos(scale * p_t). scale = pi/2 reaches 0 at p_t = 1, like (1 - p_t)^gamma; the
    literal cos(p_t) (scale 1) keeps cos(1) = 0.54 of a perfectly classified sample's
    cross-entropy. Beyond pi/2 the factor would turn negative, so scale is at most pi/2."""

    scale: float = math.pi / 2

    def __post_init__(self) -> None:
        check_range(self.scale, COS_SCALE_RANGE, "cos modulation scale")

    def weights(self, z: Tensor) -> tuple[Tensor, Tensor]:
        p = torch.sigmoid(z)
        angle = self.scale * p
        return torch.cos(angle), self.scale * p * torch.sigmoid(-z) * torch.sin(angle)


@dataclass(frozen=True)
class GaussianFactor(ModulatingFactor):
    """f(p_t) = exp(-p_t^2 / s): flat for small p_t (hard samples keep nearly all their
    cross-entropy), falling to exp(-1 / s) at p_t = 1."""

    s: float = 0.2

    def __post_init__(self) -> None:
        check_range(self.s, GAUSSIAN_S_RANGE, "gaussian modulation s")

    def weights(self, z: Tensor) -> tuple[Tensor, Tensor]:
        p = torch.sigmoid(z)
        f = torch.exp(-p * p / self.s)
        return f, (2.0 / self.s) * p * p * torch.sigmoid(-z) * f


@dataclass(frozen=True)
class SampleDependentPowerFactor(ModulatingFactor):
    """(1 - p_t)^gamma with gamma chosen per sample: `gamma_hard` where p_t < `threshold`,
    `gamma_easy` elsewhere. The defaults are Mukhoti et al. 2020's FLSD-53 (5 below 0.2, 3
    above), proposed to calibrate classifiers; the gradient treats gamma as constant per sample
    (its step has zero derivative almost everywhere)."""

    gamma_hard: float = 5.0
    gamma_easy: float = 3.0
    threshold: float = 0.2

    def weights(self, z: Tensor) -> tuple[Tensor, Tensor]:
        # Compared as logits: sigmoid(z) < t  <=>  z < logit(t), exact for every z.
        hard = z < math.log(self.threshold / (1 - self.threshold))
        gamma = torch.where(hard, self.gamma_hard, self.gamma_easy).to(z.dtype)
        f = torch.exp(-gamma * F.softplus(z))
        return f, gamma * torch.sigmoid(z) * f


@dataclass(frozen=True)
class GammaSchedule:
    """A gamma that changes over training: gamma(progress) for progress in [0, 1] goes from
    `start` to `end`, linearly or along a half cosine, reaching `end` at `ramp_fraction`.
    Starting at gamma = 0 trains early with plain cross-entropy, whose gradient is not yet
    damped for the many easy negatives the model still gets wrong.

    `alpha_start` (None: alpha stays constant) moves alpha along the same ramp, from
    `alpha_start` to the loss's alpha, so that each gamma meets the alpha that suits it (paper
    Table 1b: 0.75 for gamma 0, 0.25 for gamma 2; lower gammas want more weight on positives)."""

    start: float = 0.0
    end: float = 2.0
    ramp_fraction: float = 1.0
    shape: GammaShape = "linear"
    alpha_start: float | None = None

    def __post_init__(self) -> None:
        check_choice(self.shape, GammaShape, "gamma schedule shape")
        check_range(self.start, GAMMA_RANGE, "gamma schedule start")
        check_range(self.end, GAMMA_RANGE, "gamma schedule end")
        check_range(self.ramp_fraction, RAMP_FRACTION_RANGE, "gamma schedule ramp_fraction")
        if self.alpha_start is not None:
            check_range(self.alpha_start, ALPHA_RANGE, "gamma schedule alpha_start")

    def ramp_at(self, progress: float) -> float:
        """How far along the ramp training is at `progress`: 0 at its start, 1 at its end."""
        t = min(max(progress / self.ramp_fraction, 0.0), 1.0)
        if self.shape == "cosine":
            t = 0.5 * (1.0 - math.cos(math.pi * t))
        return t

    def gamma_at(self, progress: float) -> float:
        return self.start + (self.end - self.start) * self.ramp_at(progress)

    def alpha_at(self, progress: float, alpha: float | None) -> float | None:
        """The alpha in effect at `progress` when the loss's (final) alpha is `alpha`."""
        if self.alpha_start is None or alpha is None:
            return alpha
        return self.alpha_start + (alpha - self.alpha_start) * self.ramp_at(progress)


def resolve_factor(
    modulation: ModulatingFactor | GammaSchedule, progress: float
) -> ModulatingFactor:
    """The modulating factor in effect at `progress` (fraction of training done)."""
    if isinstance(modulation, GammaSchedule):
        return PowerFactor(modulation.gamma_at(progress))
    return modulation


def resolve_alpha(
    modulation: ModulatingFactor | GammaSchedule, alpha: float | None, progress: float
) -> float | None:
    """The alpha in effect at `progress`: `alpha`, unless a gamma schedule moves it too."""
    if isinstance(modulation, GammaSchedule):
        return modulation.alpha_at(progress, alpha)
    return alpha


# --------------------------------------------------------------------------------------------
# Reference focal loss
# --------------------------------------------------------------------------------------------


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float | None = 0.25,
    factor: ModulatingFactor | float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Elementwise focal loss. logits, targets: same shape, targets in {0, 1}.
    alpha = None disables the alpha-balancing; `factor` is a gamma or a ModulatingFactor.
    Computed in fp32 (or fp64 for fp64 inputs) whatever the input dtype and autocast state."""
    if not isinstance(factor, ModulatingFactor):
        factor = PowerFactor(float(factor))
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = logits.float() if logits.dtype != torch.float64 else logits
        t = targets.to(x.dtype)
        z = torch.where(t > 0.5, x, -x)  # logit of the true label
        f, _ = factor.weights(z)
        loss = f * F.softplus(-z)
        if alpha is not None:
            loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return _reduce(loss, reduction)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction != "none":
        raise ValueError(f"unknown reduction {reduction!r}")
    return loss


# --------------------------------------------------------------------------------------------
# Fused dense focal loss for training
# --------------------------------------------------------------------------------------------


def _negative_terms(
    x: Tensor, factor: ModulatingFactor, need_grad: bool, row_weights: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Every element of x (N, K) treated as a negative: returns (the sum of f(1-s) softplus(x)
    over the elements, rows weighted by `row_weights` (N,); the gradient of each
    term w.r.t. x, exact for rows of weight 1, or None). Works in place on fresh buffers; x is
    not modified."""
    s = torch.sigmoid(x)
    sp = F.softplus(x)  # -log(1 - s)
    # One weighted flat dot product, rather than per-row sums (N tiny matrix products).
    sp.mul_(row_weights.unsqueeze(1))
    if isinstance(factor, PowerFactor):
        gamma = factor.gamma
        # f = s^gamma; h = gamma s^gamma (1 - s); grad = f s + h sp = f (s + gamma (1 - s) sp).
        if gamma == 0:
            return sp.sum(), (s if need_grad else None)
        f = s * s if gamma == 2 else (s.clone() if gamma == 1 else s.pow(gamma))
        total = torch.dot(f.view(-1), sp.view(-1))
        if not need_grad:
            return total, None
        sp.addcmul_(sp, s, value=-1.0)  # sp * (1 - s)
        return total, s.add_(sp, alpha=gamma).mul_(f)
    f, h = factor.weights(-x)
    total = torch.dot(f.view(-1), sp.view(-1))
    if not need_grad:
        return total, None
    return total, f.mul_(s).addcmul_(h, sp)


def _positive_terms(x: Tensor, factor: ModulatingFactor) -> tuple[Tensor, Tensor]:
    """Elements of x as positives: (f(s) softplus(-x), its gradient w.r.t. x)."""
    f, h = factor.weights(x)
    sp = F.softplus(-x)
    return f * sp, -(h * sp + f * torch.sigmoid(-x))


class _DenseFocalLoss(torch.autograd.Function):
    """Forward and backward without a data-dependent shape anywhere (no nonzero, no boolean
    indexing): on a GPU nothing here waits for the device."""

    @staticmethod
    def forward(
        ctx, logits: Tensor, anchor_classes: Tensor, alpha: float | None, factor: ModulatingFactor
    ):
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x = logits.detach().float()
            num_classes = x.shape[-1]
            flat_x = x.reshape(-1, num_classes)
            flat_classes = anchor_classes.reshape(-1)
            pos_weight, neg_weight = (1.0, 1.0) if alpha is None else (alpha, 1.0 - alpha)
            need_grad = ctx.needs_input_grad[0]

            # Every (anchor, class) pair of the non-ignored anchors as a negative.
            kept = (flat_classes != IGNORE).to(x.dtype)  # masks as weights: no indexing
            neg_sum, grad = _negative_terms(flat_x, factor, need_grad, kept)

            # Each anchor's ground-truth class (0 for anchors without one, masked below): its
            # pair's negative term is replaced by the positive one.
            is_pos = flat_classes >= 0
            true_class = flat_classes.clamp(min=0).unsqueeze(1)
            true_x = flat_x.gather(1, true_class).squeeze(1)
            pos_loss, pos_grad = _positive_terms(true_x, factor)
            pos_mask = is_pos.to(x.dtype)
            wrong_neg, _ = _negative_terms(true_x.unsqueeze(1), factor, False, pos_mask)
            total = neg_weight * (neg_sum - wrong_neg) + pos_weight * torch.dot(pos_loss, pos_mask)
            if need_grad:
                # grad holds the negative-term gradient; it is scaled by neg_weight in
                # backward, so positives are stored divided by it (when it is not zero).
                if neg_weight > 0:
                    pos_value = (pos_weight / neg_weight) * pos_grad
                    ctx.scale = neg_weight
                else:
                    grad.zero_()
                    pos_value = pos_weight * pos_grad
                    ctx.scale = 1.0
                current = grad.gather(1, true_class).squeeze(1)
                grad.scatter_(1, true_class, torch.where(is_pos, pos_value, current).unsqueeze(1))
                grad.masked_fill_((flat_classes == IGNORE).unsqueeze(1), 0.0)
                ctx.grad = grad.view(logits.shape)
                ctx.input_dtype = logits.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad = getattr(ctx, "grad", None)
        if grad is None:
            raise RuntimeError("dense_focal_loss: backward can run only once per forward")
        ctx.grad = None  # the saved gradient is scaled in place and handed out
        grad.mul_(grad_output.float() * ctx.scale)
        return grad.to(ctx.input_dtype), None, None, None


def dense_focal_loss(
    cls_logits: Tensor,
    anchor_classes: Tensor,
    alpha: float | None = 0.25,
    factor: ModulatingFactor | float = 2.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Sum of the focal loss over all non-ignored anchors and all K classes.

    cls_logits: (..., A, K) logits, any float dtype; anchor_classes: (..., A) int64 with the
    ground-truth class in [0, K) for foreground anchors, -1 for background, -2 (IGNORE) for
    anchors left out of the loss. Returns an fp32 scalar (not normalised).

    label_smoothing eps (cross-entropy only: f = 1): every binary target moves towards 1/2 by
    eps, to 1 - eps/2 for an anchor's true class and eps/2 for the others (Keras' binary label
    smoothing); alpha still weights by the hard label. See `label_smoothing_term`."""
    if not isinstance(factor, ModulatingFactor):
        factor = PowerFactor(float(factor))
    if cls_logits.shape[:-1] != anchor_classes.shape:
        raise ValueError(
            f"cls_logits {tuple(cls_logits.shape)} and anchor_classes "
            f"{tuple(anchor_classes.shape)} disagree on the anchor dimensions"
        )
    loss = _DenseFocalLoss.apply(cls_logits, anchor_classes, alpha, factor)
    if label_smoothing > 0:
        if not (isinstance(factor, PowerFactor) and factor.gamma == 0):
            raise ValueError("label smoothing is defined here for cross-entropy only (gamma 0)")
        loss = loss + label_smoothing_term(cls_logits, anchor_classes, alpha, label_smoothing)
    return loss


def label_smoothing_term(
    cls_logits: Tensor, anchor_classes: Tensor, alpha: float | None, label_smoothing: float
) -> Tensor:
    """What smoothing the targets adds to the summed binary cross-entropy. With target t the
    cross-entropy of logit x is (1 - t) softplus(x) + t softplus(-x); as softplus(-x) -
    softplus(x) = -x, a negative's target eps/2 adds -(eps/2) x and a positive's 1 - eps/2 adds
    +(eps/2) x: a term linear in the logits, summed here without indexing (masks only)."""
    half_eps = label_smoothing / 2
    pos_weight, neg_weight = (1.0, 1.0) if alpha is None else (alpha, 1.0 - alpha)
    with torch.autocast(device_type=cls_logits.device.type, enabled=False):
        x = cls_logits.float()
        kept = (anchor_classes != IGNORE).to(x.dtype).unsqueeze(-1)
        is_pos = (anchor_classes >= 0).to(x.dtype)
        true_x = x.gather(-1, anchor_classes.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        pos_sum = (true_x * is_pos).sum()
        neg_sum = (x * kept).sum() - pos_sum
        return half_eps * (pos_weight * pos_sum - neg_weight * neg_sum)


# --------------------------------------------------------------------------------------------
# Box losses
# --------------------------------------------------------------------------------------------


def smooth_l1_loss(
    deltas: Tensor, target_deltas: Tensor, beta: float, reduction: str = "sum"
) -> Tensor:
    """deltas, target_deltas: (..., 4) box offsets -> smooth-L1 in fp32, summed over elements
    ("sum") or per element ("none"). beta = 0 is pure L1 (Detectron2's RetinaNet default); the
    paper era used beta = 0.11."""
    deltas = deltas.float()
    if beta < 1e-5:
        return F.l1_loss(deltas, target_deltas, reduction=reduction)
    return F.smooth_l1_loss(deltas, target_deltas, reduction=reduction, beta=beta)


def giou_loss(boxes: Tensor, target_boxes: Tensor, reduction: str = "sum") -> Tensor:
    """1 - GIoU of boxes and target_boxes, both (..., 4) xyxy, in fp32; summed ("sum") or per
    box ("none"). torchvision.ops.generalized_box_iou_loss computes the same, but indexes by a
    boolean mask, which makes a GPU wait for the device at every call; clamping does not."""
    boxes, target_boxes = boxes.float(), target_boxes.float()
    top_left = torch.maximum(boxes[..., :2], target_boxes[..., :2])
    bottom_right = torch.minimum(boxes[..., 2:], target_boxes[..., 2:])
    inter_wh = (bottom_right - top_left).clamp(min=0)  # (..., 2)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = box_area(boxes) + box_area(target_boxes) - inter
    eps = 1e-7  # keeps the ratios of degenerate (zero-area) boxes finite
    iou = inter / (union + eps)
    hull_wh = torch.maximum(boxes[..., 2:], target_boxes[..., 2:]) - torch.minimum(
        boxes[..., :2], target_boxes[..., :2]
    )
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    loss = 1.0 - (iou - (hull - union) / (hull + eps))
    return _reduce(loss, reduction)
