"""Anchor matching: IoU thresholds, ignore band, crowd regions, low-quality matches, padding."""

import pytest
import torch
from torchvision.models.detection._utils import Matcher as TorchvisionMatcher
from torchvision.ops import box_iou

from retinanet.model.anchors import AnchorGenerator
from retinanet.model.matcher import BACKGROUND, IGNORE, AnchorMatcher, pad_boxes

# Anchor 0 is a 10 x 10 square at the origin; anchor 1 lies far away from every box below.
ANCHORS = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])


def _match_one_box(box, matcher):
    """Matches of the two ANCHORS against an image holding the single box."""
    return matcher(ANCHORS, pad_boxes([torch.tensor([box])]))[0].tolist()


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ([0.0, 0.0, 10.0, 5.0], 0),  # IoU 50 / 100 = 0.5 exactly: foreground
        ([0.0, 0.0, 10.0, 4.5], IGNORE),  # IoU 0.45: the ignore band
        ([0.0, 0.0, 10.0, 4.0], IGNORE),  # IoU 0.4 exactly: ignored, not background
        ([0.0, 0.0, 10.0, 3.99], BACKGROUND),  # IoU 0.399: background
        ([0.0, 0.0, 10.0, 10.0], 0),
    ],
)
def test_iou_thresholds(box, expected):
    matcher = AnchorMatcher(0.5, 0.4, allow_low_quality_matches=False)
    assert _match_one_box(box, matcher) == [expected, BACKGROUND]


def test_low_quality_match_keeps_the_best_anchors_of_a_box_ties_included():
    # Box area 80. Anchors 0 and 1 overlap it equally (IoU 15 / 165 each), anchor 2 less
    # (5 / 80); nothing reaches 0.4.
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [9.0, 0.0, 19.0, 0.5]])
    box = torch.tensor([[7.0, 0.0, 23.0, 5.0]])
    iou = box_iou(box, anchors)[0]
    assert iou[0] == iou[1] and iou[0] < 0.4 and iou[2] < iou[0]
    with_low_quality = AnchorMatcher(allow_low_quality_matches=True)
    without = AnchorMatcher(allow_low_quality_matches=False)
    assert with_low_quality(anchors, box[None])[0].tolist() == [0, 0, BACKGROUND]
    assert without(anchors, box[None])[0].tolist() == [BACKGROUND] * 3


def test_low_quality_anchor_goes_to_the_box_it_overlaps_most():
    # Anchor 0 is box 1's best anchor (IoU 0.25) but overlaps box 0 more (IoU 0.45): as in
    # torchvision and Detectron2 it becomes foreground for box 0, its highest-IoU box.
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 4.5], [0.0, 7.5, 10.0, 10.0]]])
    iou = box_iou(boxes[0], anchors)
    assert iou[:, 0].tolist() == pytest.approx([0.45, 0.25]) and (iou[:, 1] == 0).all()
    assert AnchorMatcher()(anchors, boxes)[0].tolist() == [0, BACKGROUND]


def test_crowd_regions():
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # background, fully inside the crowd: ignored
            [20.0, 0.0, 30.0, 10.0],  # background, 60% inside the crowd: ignored
            [26.0, 0.0, 36.0, 10.0],  # background, 0% inside the crowd: stays background
            [0.0, 40.0, 10.0, 50.0],  # foreground for the box and inside the crowd: stays fg
            [100.0, 0.0, 110.0, 10.0],  # identical to the crowd box itself
        ]
    )
    boxes = pad_boxes([torch.tensor([[0.0, 40.0, 10.0, 50.0]])])
    crowd = pad_boxes([torch.tensor([[0.0, 0.0, 26.0, 60.0], [100.0, 0.0, 110.0, 10.0]])])
    matches = AnchorMatcher()(anchors, boxes, crowd)[0].tolist()
    # A crowd region is never a match target: anchor 4 is ignored, not foreground.
    assert matches == [IGNORE, IGNORE, BACKGROUND, 0, IGNORE]
    assert AnchorMatcher()(anchors, boxes)[0].tolist() == [BACKGROUND] * 3 + [0, BACKGROUND]
    # Covering less than crowd_ioa_threshold keeps an anchor background.
    strict = AnchorMatcher(crowd_ioa_threshold=0.7)(anchors, boxes, crowd)[0].tolist()
    assert strict == [IGNORE, BACKGROUND, BACKGROUND, 0, IGNORE]


def test_padding_boxes_never_match_and_images_without_boxes_are_background():
    anchors = AnchorGenerator()((128, 128), [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)])
    boxes = [
        torch.tensor(
            [[10.0, 10.0, 60.0, 50.0], [64.0, 64.0, 128.0, 128.0], [0.0, 80.0, 40.0, 128.0]]
        ),
        torch.tensor([[30.0, 20.0, 90.0, 100.0]]),
        torch.zeros(0, 4),
    ]
    padded = pad_boxes(boxes)
    assert padded.shape == (3, 3, 4)
    matches = AnchorMatcher()(anchors, padded)
    assert matches[1].max() == 0 and (matches[1] == 0).any()
    assert set(matches[0].unique().tolist()) <= {IGNORE, BACKGROUND, 0, 1, 2}
    assert (matches[2] == BACKGROUND).all()
    # Each image matched alone gives the same result as in the padded batch.
    for i, image_boxes in enumerate(boxes):
        alone = AnchorMatcher()(anchors, pad_boxes([image_boxes]))[0]
        assert torch.equal(alone, matches[i])


def test_empty_batch_has_one_padding_slot():
    padded = pad_boxes([torch.zeros(0, 4)])
    assert padded.shape == (1, 1, 4)
    assert (AnchorMatcher()(ANCHORS, padded) == BACKGROUND).all()


def test_matches_torchvision_matcher_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    anchors = AnchorGenerator()((256, 256), [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)])
    reference = TorchvisionMatcher(0.5, 0.4, allow_low_quality_matches=True)
    images = []
    for num_boxes in (1, 7, 20):
        xy = torch.rand(num_boxes, 2, generator=g) * 200
        wh = 8 + torch.rand(num_boxes, 2, generator=g) * 150
        images.append(torch.cat([xy, (xy + wh).clamp(max=256)], dim=1))
    ours = AnchorMatcher(0.5, 0.4, allow_low_quality_matches=True)(anchors, pad_boxes(images))
    for i, boxes in enumerate(images):
        # torchvision labels below-low -1 and between -2, the same codes as ours.
        expected = reference(box_iou(boxes, anchors))
        assert torch.equal(ours[i], expected), f"image {i}"
        assert (ours[i] >= 0).sum() >= len(boxes)


def test_chunked_matching_equals_one_chunk():
    g = torch.Generator().manual_seed(1)
    anchors = AnchorGenerator()((128, 128), [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)])
    xy = torch.rand(5, 4, 2, generator=g) * 90
    boxes = torch.cat([xy, xy + 10 + torch.rand(5, 4, 2, generator=g) * 40], dim=2)
    whole = AnchorMatcher()(anchors, boxes)
    chunked = AnchorMatcher(max_chunk_elements=anchors.shape[0] * 4 * 2)(anchors, boxes)
    assert torch.equal(whole, chunked)


def test_invalid_thresholds():
    with pytest.raises(ValueError, match="bg=0.6, fg=0.5"):
        AnchorMatcher(fg_iou_threshold=0.5, bg_iou_threshold=0.6)
