"""Feature pyramid: shapes for odd sizes, the top-down pathway, P6/P7 sources."""

import pytest
import torch
import torch.nn.functional as F

from retinanet.model.backbone import ResNetBackbone
from retinanet.model.fpn import FeaturePyramid


def _features(sizes=((13, 17), (7, 9), (4, 5)), channels=(16, 32, 64)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, c, h, w, generator=g) for c, (h, w) in zip(channels, sizes, strict=True)]


@pytest.mark.parametrize("p6_source", ["c5", "p5"])
def test_shapes_for_odd_sizes(p6_source):
    fpn = FeaturePyramid([16, 32, 64], out_channels=24, p6_source=p6_source)
    outputs = fpn(_features())
    # P3-P5 keep the C sizes; P6 and P7 halve with ceil (3x3 stride-2 conv, padding 1).
    assert [tuple(o.shape) for o in outputs] == [
        (2, 24, 13, 17),
        (2, 24, 7, 9),
        (2, 24, 4, 5),
        (2, 24, 2, 3),
        (2, 24, 1, 2),
    ]
    assert fpn.strides == [8, 16, 32, 64, 128]


def test_odd_image_through_a_real_backbone():
    backbone = ResNetBackbone(depth=18).eval()
    fpn = FeaturePyramid(backbone.out_channels, out_channels=32)
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 97, 131))
        outputs = fpn(features)
    assert [tuple(f.shape[-2:]) for f in features] == [(13, 17), (7, 9), (4, 5)]
    assert [tuple(o.shape[-2:]) for o in outputs] == [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]


@pytest.mark.parametrize("p6_source", ["c5", "p5"])
def test_pathway_computed_by_hand(p6_source):
    fpn = FeaturePyramid([16, 32, 64], out_channels=24, p6_source=p6_source)
    c3, c4, c5 = _features()
    with torch.no_grad():
        p3, p4, p5, p6, p7 = fpn([c3, c4, c5])
        inner5 = fpn.lateral_convs[2](c5)
        inner4 = fpn.lateral_convs[1](c4) + F.interpolate(inner5, size=(7, 9), mode="nearest")
        inner3 = fpn.lateral_convs[0](c3) + F.interpolate(inner4, size=(13, 17), mode="nearest")
        expected_p6 = fpn.p6(c5 if p6_source == "c5" else fpn.output_convs[2](inner5))
        expected = [
            fpn.output_convs[0](inner3),
            fpn.output_convs[1](inner4),
            fpn.output_convs[2](inner5),
            expected_p6,
            fpn.p7(F.relu(expected_p6)),
        ]
    for got, want in zip([p3, p4, p5, p6, p7], expected, strict=True):
        torch.testing.assert_close(got, want)
    # The P6 conv reads C5 (64 channels) in the paper, P5 (24) in torchvision's v1.
    assert fpn.p6[0].in_channels == (64 if p6_source == "c5" else 24)


def test_initialisation_and_norm():
    fpn = FeaturePyramid([16, 32, 64], out_channels=32)
    for conv in [m for m in fpn.modules() if isinstance(m, torch.nn.Conv2d)]:
        assert (conv.bias == 0).all()
        # Kaiming-uniform with a = 1: U(-b, b), b = sqrt(3 / fan_in).
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.abs().max() <= (3 / fan_in) ** 0.5
    with_gn = FeaturePyramid([16, 32, 64], out_channels=32, norm="gn")
    assert with_gn.output_convs[0][0].bias is None
    assert isinstance(with_gn.output_convs[0][1], torch.nn.GroupNorm)


def test_invalid_p6_source():
    with pytest.raises(ValueError, match="p6_source"):
        FeaturePyramid([16, 32, 64], p6_source="c4")
