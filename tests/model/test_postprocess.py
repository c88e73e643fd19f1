"""Inference post-processing against torchvision's RetinaNet and hand-made cases."""

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection.retinanet import RetinaNet as TorchvisionRetinaNet

from retinanet.model.anchors import AnchorGenerator
from retinanet.model.box_coding import BoxCoder
from retinanet.model.head import HeadOutputs
from retinanet.model.postprocess import DetectionPostprocessor, clip_boxes

FEATURE_SIZES = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]  # a 128 x 192 padded batch
NUM_CLASSES = 5


def _torchvision_postprocessor(score_threshold, topk, nms_threshold, max_detections):
    backbone = nn.Module()
    backbone.out_channels = 8  # only the head reads it; the backbone is never run
    return TorchvisionRetinaNet(
        backbone,
        NUM_CLASSES,
        score_thresh=score_threshold,
        nms_thresh=nms_threshold,
        detections_per_img=max_detections,
        topk_candidates=topk,
    ).eval()


def _assert_same_detections(got, expected):
    """One-to-one: each expected detection has exactly one detection with the same label, a
    score within 1e-6 and a box within 1e-3 px (NMS may order equal scores differently)."""
    assert len(got["boxes"]) == len(expected["boxes"])
    close = (
        (got["labels"][:, None] == expected["labels"][None, :])
        & ((got["scores"][:, None] - expected["scores"][None, :]).abs() <= 1e-6)
        & ((got["boxes"][:, None] - expected["boxes"][None, :]).abs().amax(-1) <= 1e-3)
    )
    assert (close.sum(0) == 1).all() and (close.sum(1) == 1).all()


@pytest.mark.parametrize(
    ("score_threshold", "topk", "nms_threshold", "max_detections"),
    [(0.05, 40, 0.5, 300), (0.05, 1000, 0.5, 25), (0.3, 15, 0.3, 100), (0.0, 30, 0.7, 50)],
)
def test_matches_torchvision(score_threshold, topk, nms_threshold, max_detections):
    g = torch.Generator().manual_seed(0)
    anchors = AnchorGenerator()((128, 192), FEATURE_SIZES)
    num_anchors = anchors.shape[0]
    cls_logits = torch.randn(2, num_anchors, NUM_CLASSES, generator=g) * 2 - 3
    box_deltas = torch.randn(2, num_anchors, 4, generator=g) * 0.5
    box_deltas[:, ::50, 2:] = 8.0  # some huge boxes: exercises the scale clamp and clipping
    image_sizes = torch.tensor([[120, 190], [100, 150]])
    original_sizes = torch.tensor([[240, 380], [50, 80]])
    counts = AnchorGenerator().num_anchors_per_level(FEATURE_SIZES)

    postprocess = DetectionPostprocessor(
        BoxCoder(), score_threshold, topk, nms_threshold, max_detections
    )
    outputs = HeadOutputs(cls_logits, box_deltas, anchors, counts)
    ours = postprocess(outputs, image_sizes, original_sizes)

    reference = _torchvision_postprocessor(score_threshold, topk, nms_threshold, max_detections)
    head_outputs = {
        "cls_logits": list(cls_logits.split(counts, dim=1)),
        "bbox_regression": list(box_deltas.split(counts, dim=1)),
    }
    per_image_anchors = [list(anchors.split(counts))] * 2
    shapes = [tuple(s) for s in image_sizes.tolist()]
    with torch.no_grad():
        expected = reference.postprocess_detections(head_outputs, per_image_anchors, shapes)
        expected = reference.transform.postprocess(
            expected, shapes, [tuple(s) for s in original_sizes.tolist()]
        )
    for got, want in zip(ours, expected, strict=True):
        assert len(want["boxes"]) > 5  # the comparison needs something to compare
        _assert_same_detections(got, want)
        assert torch.equal(got["scores"], got["scores"].sort(descending=True).values)
    if max_detections == 25:
        assert all(len(d["boxes"]) == 25 for d in ours)


def _single_anchor_case(logit: float, deltas=(0.0, 0.0, 0.0, 0.0)):
    """One level with two anchors and two classes; only (anchor 0, class 1) can fire."""
    anchors = torch.tensor([[-10.0, 20.0, 30.0, 60.0], [50.0, 50.0, 60.0, 60.0]])
    cls_logits = torch.full((1, 2, 2), -20.0)
    cls_logits[0, 0, 1] = logit
    box_deltas = torch.zeros(1, 2, 4)
    box_deltas[0, 0] = torch.tensor(deltas)
    return cls_logits, box_deltas, anchors


def test_single_detection_is_clipped_and_scaled_to_the_original_image():
    cls_logits, box_deltas, anchors = _single_anchor_case(2.0)
    postprocess = DetectionPostprocessor(BoxCoder())
    # Resized image 50 x 100 (H x W) of an original 100 x 400: x scales by 4, y by 2.
    outputs = HeadOutputs(cls_logits, box_deltas, anchors, [2])
    detections = postprocess(outputs, torch.tensor([[50, 100]]), torch.tensor([[100, 400]]))[0]
    assert detections["labels"].tolist() == [1]
    assert detections["scores"].tolist() == pytest.approx([1 / (1 + math.exp(-2.0))])
    # Anchor [-10, 20, 30, 60] clipped to [0, 0, 100, 50] -> [0, 20, 30, 50], then scaled.
    assert detections["boxes"].tolist() == [pytest.approx([0.0, 40.0, 120.0, 100.0])]
    assert detections["boxes"].dtype == torch.float32


def test_score_threshold_is_strict():
    threshold = 0.25
    logit = math.log(threshold / (1 - threshold))
    postprocess = DetectionPostprocessor(BoxCoder(), score_threshold=threshold)
    sizes = torch.tensor([[100, 100]])
    for offset, expected in [(-1e-4, 0), (1e-4, 1)]:
        cls_logits, box_deltas, anchors = _single_anchor_case(logit + offset)
        found = postprocess(HeadOutputs(cls_logits, box_deltas, anchors, [2]), sizes, sizes)[0]
        assert len(found["boxes"]) == expected


def test_nms_is_per_class():
    # Two identical boxes: suppressed if the class is the same, both kept otherwise.
    anchors = torch.tensor([[10.0, 10.0, 50.0, 50.0], [10.0, 10.0, 50.0, 50.0]])
    sizes = torch.tensor([[100, 100]])
    postprocess = DetectionPostprocessor(BoxCoder())
    same = torch.tensor([[[3.0, -20.0], [2.0, -20.0]]])
    different = torch.tensor([[[3.0, -20.0], [-20.0, 2.0]]])
    deltas = torch.zeros(1, 2, 4)
    kept_same = postprocess(HeadOutputs(same, deltas, anchors, [2]), sizes, sizes)[0]
    kept_different = postprocess(HeadOutputs(different, deltas, anchors, [2]), sizes, sizes)[0]
    assert kept_same["labels"].tolist() == [0]
    assert kept_different["labels"].tolist() == [0, 1]


def test_no_candidates_gives_empty_detections():
    cls_logits, box_deltas, anchors = _single_anchor_case(-10.0)
    sizes = torch.tensor([[100, 100], [100, 100]])
    outputs = HeadOutputs(cls_logits.expand(2, -1, -1), box_deltas.expand(2, -1, -1), anchors, [2])
    detections = DetectionPostprocessor(BoxCoder())(outputs, sizes, sizes)
    for d in detections:
        assert d["boxes"].shape == (0, 4) and d["scores"].shape == (0,)
        assert d["labels"].shape == (0,)


def test_invalid_score_threshold():
    with pytest.raises(ValueError, match="score_threshold"):
        DetectionPostprocessor(BoxCoder(), score_threshold=1.0)


@pytest.mark.parametrize(
    "regime",
    [
        "few_hot_anchors",
        "many_hot_anchors_few_pairs",
        "most_pairs_pass",
        "no_threshold",
        "nothing_passes",
    ],
)
@pytest.mark.parametrize("k", [5, 1000])
def test_top_above_threshold_selects_the_k_best_pairs_in_every_regime(regime, k):
    from retinanet.model.postprocess import top_above_threshold

    g = torch.Generator().manual_seed(0)
    batch, anchors, classes = 3, 400, 20
    threshold = -2.0
    if regime == "few_hot_anchors":
        logits = -8.0 + torch.randn(batch, anchors, classes, generator=g)
        logits[:, ::37, 3] = 1.0 + torch.rand(batch, len(range(0, anchors, 37)), generator=g)
    elif regime == "many_hot_anchors_few_pairs":
        # each anchor is hot on about one class in twenty: > 1/8 of anchors, < 1/8 of pairs
        logits = -4.0 + torch.randn(batch, anchors, classes, generator=g)
        logits[torch.rand(batch, anchors, classes, generator=g) < 0.05] += 6.0
    elif regime in ("most_pairs_pass", "no_threshold"):
        logits = torch.randn(batch, anchors, classes, generator=g)
        threshold = -math.inf if regime == "no_threshold" else -2.0
    else:
        logits = -9.0 + torch.rand(batch, anchors, classes, generator=g)
    values, columns, valid = top_above_threshold(logits, threshold, k)
    flat = logits.reshape(batch, -1)
    for i in range(batch):
        above = flat[i][flat[i] > threshold]
        expected = above.sort(descending=True).values[:k]
        got = values[i][valid[i]].sort(descending=True).values
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(flat[i, columns[i][valid[i]]], values[i][valid[i]])


def _split_inputs(score_threshold=0.05, topk=40, nms_threshold=0.5, max_detections=300):
    """The inputs of test_matches_torchvision, and the postprocessor."""
    g = torch.Generator().manual_seed(0)
    anchors = AnchorGenerator()((128, 192), FEATURE_SIZES)
    cls_logits = torch.randn(2, anchors.shape[0], NUM_CLASSES, generator=g) * 2 - 3
    box_deltas = torch.randn(2, anchors.shape[0], 4, generator=g) * 0.5
    box_deltas[:, ::50, 2:] = 8.0
    counts = AnchorGenerator().num_anchors_per_level(FEATURE_SIZES)
    postprocess = DetectionPostprocessor(
        BoxCoder(), score_threshold, topk, nms_threshold, max_detections
    )
    return postprocess, cls_logits, box_deltas, anchors, counts


def _assert_padded_equals(padded, eager, max_detections):
    batch = len(eager)
    assert padded.boxes.shape == (batch, max_detections, 4)
    assert padded.scores.shape == padded.labels.shape == (batch, max_detections)
    assert padded.boxes.dtype == torch.float32 and padded.labels.dtype == torch.int64
    for i, want in enumerate(eager):
        n = int(padded.num_detections[i])
        assert n == len(want["boxes"])
        got = {
            "boxes": padded.boxes[i, :n],
            "scores": padded.scores[i, :n],
            "labels": padded.labels[i, :n],
        }
        _assert_same_detections(got, want)
        assert torch.equal(got["scores"], got["scores"].sort(descending=True).values)
        assert (padded.boxes[i, n:] == 0).all() and (padded.scores[i, n:] == 0).all()
        assert (padded.labels[i, n:] == -1).all()


@pytest.mark.parametrize(
    ("score_threshold", "topk", "nms_threshold", "max_detections"),
    [
        (0.05, 40, 0.5, 300),  # fewer detections than D: padding
        (0.05, 1000, 0.5, 25),  # the D cap; top-k larger than the small levels
        (0.3, 15, 0.3, 100),
        (0.0, 30, 0.7, 50),  # no threshold
        (0.97, 1000, 0.5, 100),  # a handful pass
    ],
)
def test_padded_path_gives_the_eager_detections(
    score_threshold, topk, nms_threshold, max_detections
):
    """The export path (top-k before threshold, one class-wise NMS for the batch, fixed-size
    output) returns what the eager path returns, in resized-image pixels."""
    postprocess, cls_logits, box_deltas, anchors, counts = _split_inputs(
        score_threshold, topk, nms_threshold, max_detections
    )
    image_sizes = torch.tensor([[120, 190], [100, 150]])
    outputs = HeadOutputs(cls_logits, box_deltas, anchors, counts)
    eager = postprocess(outputs, image_sizes, image_sizes)
    padded = postprocess.padded(
        cls_logits.split(counts, dim=1),
        box_deltas.split(counts, dim=1),
        anchors.split(counts),
        image_sizes,
    )
    assert sum(len(d["boxes"]) for d in eager) > 2  # something to compare
    _assert_padded_equals(padded, eager, max_detections)


def test_padded_path_with_one_size_for_the_batch_and_no_candidates():
    postprocess, cls_logits, box_deltas, anchors, counts = _split_inputs()
    cls_logits[1] = -20.0  # the second image has nothing above the threshold
    size = torch.tensor([[128, 160]])
    outputs = HeadOutputs(cls_logits, box_deltas, anchors, counts)
    eager = postprocess(outputs, size.expand(2, 2), size.expand(2, 2))
    padded = postprocess.padded(
        cls_logits.split(counts, dim=1),
        box_deltas.split(counts, dim=1),
        anchors.split(counts),
        size,
    )
    assert len(eager[0]["boxes"]) > 5 and len(eager[1]["boxes"]) == 0
    assert padded.num_detections.tolist() == [len(eager[0]["boxes"]), 0]
    _assert_padded_equals(padded, eager, 300)


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_clip_boxes_clips_and_makes_no_tensor_from_python_data():
    # A tensor made from Python data inside the op (a list index, torch.tensor) would be a
    # blocking host-to-device copy on a GPU, once per batch.
    boxes = torch.tensor([[[-5.0, 3.0, 25.0, 12.0], [1.0, -2.0, 4.0, 30.0]]])
    image_sizes = torch.tensor([[10, 20]])  # (H, W)
    with _RecordOps() as ops:
        clipped = clip_boxes(boxes, image_sizes)
    assert "lift_fresh" not in ops.names, ops.names
    expected = torch.tensor([[[0.0, 3.0, 20.0, 10.0], [1.0, 0.0, 4.0, 10.0]]])
    assert torch.equal(clipped, expected)
