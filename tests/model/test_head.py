"""RetinaNet head: output layout, initialisation, optional normalisation."""

import math

import pytest
import torch
from torch import nn

from retinanet.model.head import RetinaNetHead
from retinanet.model.norm import GroupNorm


def test_output_layout_channel_a_times_k_plus_k_is_anchor_a_class_k():
    num_anchors, num_classes = 3, 4
    head = RetinaNetHead(8, num_anchors, num_classes, num_convs=1)
    with torch.no_grad():
        # Zero weights: every output equals its channel's bias, i.e. its channel index.
        head.cls_score.weight.zero_()
        head.cls_score.bias.copy_(torch.arange(num_anchors * num_classes, dtype=torch.float32))
        head.box_pred.weight.zero_()
        head.box_pred.bias.copy_(torch.arange(num_anchors * 4, dtype=torch.float32))
    sizes = [(3, 5), (2, 2)]
    features = [torch.randn(2, 8, h, w) for h, w in sizes]
    cls_logits, box_deltas = head(features)
    total = sum(h * w for h, w in sizes) * num_anchors
    assert cls_logits.shape == (2, total, num_classes) and box_deltas.shape == (2, total, 4)
    # Anchor index: level offset + (y * W + x) * A + a; every location repeats the pattern.
    expected_cls = torch.arange(num_anchors * num_classes, dtype=torch.float32).view(-1, 4)
    expected_box = torch.arange(num_anchors * 4, dtype=torch.float32).view(-1, 4)
    assert torch.equal(cls_logits, expected_cls.repeat(total // num_anchors, 1).expand(2, -1, -1))
    assert torch.equal(box_deltas, expected_box.repeat(total // num_anchors, 1).expand(2, -1, -1))


def test_locations_are_row_major_and_levels_in_order():
    head = RetinaNetHead(1, 1, 1, num_convs=0)
    with torch.no_grad():
        # Output = input value at the location (a centred 3x3 kernel with a single 1).
        head.cls_score.weight.zero_()
        head.cls_score.weight[0, 0, 1, 1] = 1.0
        head.cls_score.bias.zero_()
    p3 = torch.arange(6, dtype=torch.float32).view(1, 1, 2, 3)
    p4 = torch.tensor([[[[100.0]]]])
    cls_logits, _ = head([p3, p4])
    assert cls_logits.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 100.0]


def test_initialisation_follows_the_paper():
    pi = 0.01
    head = RetinaNetHead(256, 9, 80, prior_probability=pi)
    # b = -log((1 - pi) / pi), so sigmoid(b) = pi.
    assert torch.allclose(head.cls_score.bias, torch.full((720,), -math.log((1 - pi) / pi)))
    assert torch.sigmoid(head.cls_score.bias).mean().item() == pytest.approx(pi)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 10  # 4 + 4 subnet convs, class and box output convs
    for conv in convs:
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.05)
        if conv is not head.cls_score:
            assert (conv.bias == 0).all()
    # Class subnet: 4 x (3x3 conv, ReLU); the box subnet is class-agnostic: 4 A outputs.
    assert [type(m) for m in head.cls_subnet[0]] == [nn.Conv2d, nn.ReLU]
    assert len(head.cls_subnet) == 4 and len(head.box_subnet) == 4
    assert head.cls_score.out_channels == 9 * 80 and head.box_pred.out_channels == 9 * 4


def test_group_norm_head():
    head = RetinaNetHead(64, 9, 3, norm="gn")
    block = head.cls_subnet[0]
    assert [type(m) for m in block] == [nn.Conv2d, GroupNorm, nn.ReLU]
    assert block[0].bias is None and block[1].num_groups == 32
    cls_logits, box_deltas = head([torch.randn(1, 64, 4, 4)])
    assert cls_logits.shape == (1, 144, 3) and box_deltas.shape == (1, 144, 4)


def test_invalid_prior_probability():
    with pytest.raises(ValueError, match="prior_probability"):
        RetinaNetHead(8, 9, 3, prior_probability=1.0)
