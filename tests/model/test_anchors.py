"""Anchor count, order, centres and sizes; torchvision-exact quantised anchors."""

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchors
from torchvision.models.detection.image_list import ImageList

from retinanet.model.anchors import AnchorGenerator

SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
RATIOS = (0.5, 1.0, 2.0)
# A 256 x 384 input: P3 32 x 48 ... P7 2 x 3.
IMAGE_SIZE = (256, 384)
FEATURE_SIZES = [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]


def _levels(anchors: torch.Tensor, feature_sizes) -> list[torch.Tensor]:
    """Split (sum_l H_l W_l A, 4) anchors into per-level (H_l, W_l, A, 4)."""
    counts = [h * w * 9 for h, w in feature_sizes]
    return [
        level.view(h, w, 9, 4)
        for level, (h, w) in zip(anchors.split(counts), feature_sizes, strict=True)
    ]


def test_count_is_nine_per_location_summed_over_levels():
    generator = AnchorGenerator()
    anchors = generator(IMAGE_SIZE, FEATURE_SIZES)
    assert generator.num_anchors_per_location == 9
    per_level = [h * w * 9 for h, w in FEATURE_SIZES]
    assert generator.num_anchors_per_level(FEATURE_SIZES) == per_level
    assert anchors.shape == (sum(per_level), 4) and anchors.dtype == torch.float32


def test_centres_sit_on_the_stride_grid_with_offset_zero():
    anchors = AnchorGenerator()(IMAGE_SIZE, FEATURE_SIZES)
    for level, stride, (h, w) in zip(
        _levels(anchors, FEATURE_SIZES), (8, 16, 32, 64, 128), FEATURE_SIZES, strict=True
    ):
        centre_x = (level[..., 0] + level[..., 2]) / 2  # (H, W, A)
        centre_y = (level[..., 1] + level[..., 3]) / 2
        expected_x = (torch.arange(w) * stride).float().view(1, w, 1).expand(h, w, 9)
        expected_y = (torch.arange(h) * stride).float().view(h, 1, 1).expand(h, w, 9)
        torch.testing.assert_close(centre_x, expected_x, rtol=0, atol=1e-4)
        torch.testing.assert_close(centre_y, expected_y, rtol=0, atol=1e-4)


def test_offset_moves_centres_by_a_fraction_of_the_stride():
    anchors = AnchorGenerator(offset=0.5)(IMAGE_SIZE, FEATURE_SIZES)
    p4 = _levels(anchors, FEATURE_SIZES)[1]
    assert ((p4[0, 0, :, 0] + p4[0, 0, :, 2]) / 2).tolist() == pytest.approx([8.0] * 9)
    assert ((p4[2, 5, :, 1] + p4[2, 5, :, 3]) / 2).tolist() == pytest.approx([40.0] * 9)


def test_sizes_ratio_major_scale_minor_with_equal_areas():
    anchors = AnchorGenerator()(IMAGE_SIZE, FEATURE_SIZES)
    for level_index, level in enumerate(_levels(anchors, FEATURE_SIZES)):
        base = 32 * 2**level_index  # 32 on P3 ... 512 on P7
        cell = level[-1, -1]  # any location: all share the same 9 shapes
        widths = (cell[:, 2] - cell[:, 0]).double()
        heights = (cell[:, 3] - cell[:, 1]).double()
        for r, ratio in enumerate(RATIOS):
            for s, scale in enumerate(SCALES):
                a = r * len(SCALES) + s
                side = base * scale
                # Equal area for every ratio; height / width = ratio.
                assert widths[a] * heights[a] == pytest.approx(side**2, rel=1e-5)
                assert heights[a] / widths[a] == pytest.approx(ratio, rel=1e-5)
                assert widths[a] == pytest.approx(side / math.sqrt(ratio), rel=1e-5)


def test_location_order_is_row_major_and_p3_first():
    anchors = AnchorGenerator()(IMAGE_SIZE, FEATURE_SIZES)
    # Anchor index (y * W + x) * 9 + a on P3: the 9 anchors of (y=0, x=1) follow those of (0, 0),
    # the 9 anchors of (y=1, x=0) start at 48 * 9.
    centre_x = (anchors[:, 0] + anchors[:, 2]) / 2
    centre_y = (anchors[:, 1] + anchors[:, 3]) / 2
    assert centre_x[9].item() == pytest.approx(8.0) and centre_y[9].item() == pytest.approx(0.0)
    assert centre_x[48 * 9].item() == pytest.approx(0.0)
    assert centre_y[48 * 9].item() == pytest.approx(8.0)
    # The first 32 * 48 * 9 anchors are P3's; anchor 3 (ratio 1, scale 1) is 32 x 32 there.
    widths = anchors[:, 2] - anchors[:, 0]
    assert widths[3].item() == pytest.approx(32.0)
    p3_count = 32 * 48 * 9
    assert widths[:p3_count].max() < widths[p3_count:].max()
    assert widths[p3_count + 3].item() == pytest.approx(64.0)


@pytest.mark.parametrize("padded_size", [(608, 800), (800, 1088), (256, 384)])
def test_quantized_anchors_equal_torchvision(padded_size):
    # torchvision's retinanet_resnet50_fpn anchors: integer sizes per octave, rounded corners,
    # strides taken as padded image size // feature size (P6/P7 then differ from 64/128 when
    # the image is padded to 32 only).
    reference = TorchvisionAnchors(
        tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (32, 64, 128, 256, 512)),
        ((0.5, 1.0, 2.0),) * 5,
    )
    height, width = padded_size
    feature_sizes = []
    h, w = height // 8, width // 8
    for _ in range(5):
        feature_sizes.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)  # a 3x3 stride-2 conv with padding 1
    images = ImageList(torch.zeros(2, 3, height, width), [(height - 5, width - 7), padded_size])
    features = [torch.zeros(2, 1, fh, fw) for fh, fw in feature_sizes]
    expected = reference(images, features)[0]

    ours = AnchorGenerator(quantize=True, stride_from_feature_size=True)
    got = ours(padded_size, feature_sizes)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_unquantized_anchors_differ_from_quantized_by_rounding_only():
    exact = AnchorGenerator()(IMAGE_SIZE, FEATURE_SIZES)
    quantized = AnchorGenerator(quantize=True)(IMAGE_SIZE, FEATURE_SIZES)
    # int() drops < 1 px of size, round() moves each corner by <= 0.5 px more.
    assert 0 < (exact - quantized).abs().max() <= 1.0


def test_stride_from_feature_size_only_matters_when_not_divisible():
    generator = AnchorGenerator(stride_from_feature_size=True)
    assert generator.level_strides(IMAGE_SIZE, FEATURE_SIZES) == [
        (8, 8),
        (16, 16),
        (32, 32),
        (64, 64),
        (128, 128),
    ]
    # 608 = 19 * 32: P6 has ceil(19 / 2) = 10 rows, so torchvision's stride is 608 // 10 = 60.
    strides = generator.level_strides((608, 608), [(76, 76), (38, 38), (19, 19), (10, 10), (5, 5)])
    assert strides[3:] == [(60, 60), (121, 121)]


def test_anchors_are_cached_per_shape():
    generator = AnchorGenerator()
    first = generator(IMAGE_SIZE, FEATURE_SIZES)
    assert generator(IMAGE_SIZE, FEATURE_SIZES) is first
    other = generator((128, 128), [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)])
    assert other.shape[0] == 9 * (256 + 64 + 16 + 4 + 1)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="one anchor size per level"):
        AnchorGenerator(sizes=(32, 64), strides=(8, 16, 32))
    with pytest.raises(ValueError, match="positive"):
        AnchorGenerator(aspect_ratios=(0.0, 1.0))
    with pytest.raises(ValueError, match="must not be empty"):
        AnchorGenerator(scales=())
    with pytest.raises(ValueError, match="expected 5 feature levels"):
        AnchorGenerator()(IMAGE_SIZE, FEATURE_SIZES[:4])
