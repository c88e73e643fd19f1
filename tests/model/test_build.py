"""build_model: each config key reaches the part it configures."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from retinanet.config import load_config
from retinanet.model.build import build_model
from retinanet.model.losses import (
    CosineFactor,
    ExponentialFactor,
    GammaSchedule,
    GaussianFactor,
    PowerFactor,
    SampleDependentPowerFactor,
)
from retinanet.model.norm import FrozenBatchNorm2d, GroupNorm

SHAPES = Path(__file__).resolve().parents[2] / "configs" / "shapes.yaml"
SMALL = ["model.fpn.channels=16", "model.backbone.blocks=[1,1,1,1]"]


def _modules(module: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, kind)]


def test_shapes_recipe_builds_what_it_says():
    cfg = load_config(SHAPES, SMALL)
    model = build_model(cfg, num_classes=7)
    assert model.head.cls_score.out_channels == 7 * 9  # 9 anchors per location
    # ResNet-10: one basic block per stage.
    stages = (model.backbone.res2, model.backbone.res3, model.backbone.res4, model.backbone.res5)
    assert [len(stage) for stage in stages] == [1, 1, 1, 1]
    assert _modules(model.fpn, GroupNorm) and _modules(model.head, GroupNorm)
    assert not _modules(model.backbone, FrozenBatchNorm2d)  # bn from scratch
    assert model.anchor_generator.sizes == [16.0, 32.0, 64.0, 128.0, 256.0]
    assert model.postprocessor.score_threshold == cfg.model.inference.score_threshold
    # The prior-probability bias: sigmoid(bias) = 0.01 for every class output.
    bias = model.head.cls_score.bias
    torch.testing.assert_close(torch.sigmoid(bias), torch.full_like(bias, 0.01))


def test_no_norm_means_plain_convs_with_bias():
    cfg = load_config(SHAPES, [*SMALL, "model.fpn.norm=null", "model.head.norm="])
    model = build_model(cfg, num_classes=3)
    assert not _modules(model.fpn, GroupNorm) and not _modules(model.head, GroupNorm)
    convs = _modules(model.fpn, nn.Conv2d) + _modules(model.head, nn.Conv2d)
    assert all(conv.bias is not None for conv in convs)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["loss.gamma=1.5"], PowerFactor(1.5)),
        (["loss.modulation=exponential", "loss.exponential_beta=3"], ExponentialFactor(3.0)),
        (["loss.modulation=cos"], CosineFactor(math.pi / 2)),
        (["loss.modulation=cos", "loss.cos_scale=1"], CosineFactor(1.0)),
        (["loss.modulation=gaussian", "loss.gaussian_s=0.3"], GaussianFactor(0.3)),
        (["loss.modulation=flsd"], SampleDependentPowerFactor()),
        (["loss.gamma_schedule=cosine", "loss.gamma_start=0.5"],
         GammaSchedule(0.5, 2.0, 1.0, "cosine")),
        (["loss.gamma_schedule=linear", "loss.alpha_start=0.75"],
         GammaSchedule(0.0, 2.0, 1.0, "linear", alpha_start=0.75)),
    ],
)  # fmt: skip
def test_loss_keys_reach_the_criterion(overrides, expected):
    cfg = load_config(SHAPES, [*SMALL, *overrides])
    criterion = build_model(cfg, num_classes=2).criterion
    assert criterion.modulation == expected
    assert criterion.alpha == cfg.loss.alpha and criterion.label_smoothing == 0


def test_label_smoothing_reaches_the_criterion():
    cfg = load_config(SHAPES, [*SMALL, "loss.gamma=0", "loss.label_smoothing=0.1"])
    assert build_model(cfg, num_classes=2).criterion.label_smoothing == 0.1


def test_no_classes_is_an_error():
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        build_model(load_config(SHAPES, SMALL), num_classes=0)


def test_sections_passed_whole_reach_their_parts():
    overrides = [
        "model.backbone.norm_eps=0.001",
        "model.backbone.freeze_at=1",
        "model.anchors.sizes=[8,16,32,64,128]",
        "model.anchors.offset=0.5",
        "model.head.num_convs=2",
        "model.matcher.fg_iou_threshold=0.6",
        "model.matcher.crowd_ioa_threshold=0.7",
        "model.inference.score_threshold=0.2",
        "model.inference.max_detections=7",
    ]
    model = build_model(load_config(SHAPES, [*SMALL, *overrides]), num_classes=3)
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.eps == 0.001 for m in norms)
    stem = model.backbone.stem.parameters()
    assert not any(p.requires_grad for p in stem)
    assert all(p.requires_grad for p in model.backbone.res2.parameters())
    assert model.anchor_generator.sizes == [8, 16, 32, 64, 128]
    assert model.anchor_generator.offset == 0.5
    assert len(model.head.cls_subnet) == 2  # one (conv, norm, ReLU) block per layer
    matcher = model.criterion.matcher
    assert (matcher.fg_iou_threshold, matcher.crowd_ioa_threshold) == (0.6, 0.7)
    post = model.postprocessor
    assert (post.score_threshold, post.max_detections) == (0.2, 7)
