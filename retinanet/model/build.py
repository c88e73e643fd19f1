"""The one place where a Config becomes a model: config keys -> constructor arguments."""

from __future__ import annotations

from dataclasses import asdict

from ..config import Config, LossConfig
from .anchors import AnchorGenerator
from .backbone import ResNetBackbone
from .box_coding import BoxCoder
from .criterion import RetinaNetCriterion
from .fpn import FeaturePyramid
from .head import RetinaNetHead
from .losses import (
    CosineFactor,
    ExponentialFactor,
    GammaSchedule,
    GaussianFactor,
    ModulatingFactor,
    PowerFactor,
    SampleDependentPowerFactor,
)
from .matcher import AnchorMatcher
from .postprocess import DetectionPostprocessor
from .retinanet import RetinaNet


def build_modulation(loss: LossConfig) -> ModulatingFactor | GammaSchedule:
    """The focal loss's modulating factor from loss.modulation / loss.gamma(_schedule)."""
    if loss.modulation == "exponential":
        return ExponentialFactor(loss.exponential_beta)
    if loss.modulation == "cos":
        return CosineFactor(loss.cos_scale)
    if loss.modulation == "gaussian":
        return GaussianFactor(loss.gaussian_s)
    if loss.modulation == "flsd":
        return SampleDependentPowerFactor()
    if loss.gamma_schedule:
        return GammaSchedule(
            loss.gamma_start,
            loss.gamma,
            loss.gamma_ramp_fraction,
            loss.gamma_schedule,
            loss.alpha_start,
        )
    return PowerFactor(loss.gamma)


def build_model(cfg: Config, num_classes: int, load_backbone_weights: bool = True) -> RetinaNet:
    """A RetinaNet for `num_classes` classes. load_backbone_weights=False skips the ImageNet
    weights (e.g. when a checkpoint will overwrite every parameter anyway)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    m = cfg.model
    # The backbone, anchors, head, matcher and inference sections hold exactly their part's
    # keyword arguments (tests/model/test_build.py checks that every key reaches its part).
    weights = (m.backbone.weights or None) if load_backbone_weights else None
    backbone = ResNetBackbone(**{**asdict(m.backbone), "weights": weights})
    fpn = FeaturePyramid(backbone.out_channels, m.fpn.channels, m.fpn.p6_source, m.fpn.norm or None)
    anchor_generator = AnchorGenerator(strides=fpn.strides, **asdict(m.anchors))
    head = RetinaNetHead(
        fpn.out_channels, anchor_generator.num_anchors_per_location, num_classes, **asdict(m.head)
    )
    box_coder = BoxCoder(tuple(m.box_weights), m.box_scale_clamp)
    matcher = AnchorMatcher(**asdict(m.matcher))
    criterion = RetinaNetCriterion(
        matcher,
        box_coder,
        alpha=cfg.loss.alpha,
        modulation=build_modulation(cfg.loss),
        label_smoothing=cfg.loss.label_smoothing,
        box_loss=cfg.loss.box_loss,
        smooth_l1_beta=cfg.loss.smooth_l1_beta,
        box_loss_weight=cfg.loss.box_loss_weight,
        normalizer=cfg.loss.normalizer,
        ema_momentum=cfg.loss.ema_momentum,
        ema_initial=cfg.loss.ema_initial,
    )
    postprocessor = DetectionPostprocessor(box_coder, **asdict(m.inference))
    return RetinaNet(
        backbone,
        fpn,
        head,
        anchor_generator,
        criterion,
        postprocessor,
        cfg.input.pixel_mean,
        cfg.input.pixel_std,
    )
