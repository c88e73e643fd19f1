"""The loss-distribution driver and tools/analyze_loss.py on a tiny model."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from torchvision.ops import box_iou

from retinanet.analysis.loss_study import (
    anchors_in_padding,
    collect_loss_distribution,
    sample_image_indices,
)
from retinanet.cli import main as cli
from retinanet.data import collate_detection, create_test_loader
from retinanet.data.build import build_dataset, resolve_data_paths
from retinanet.engine.checkpoint import load_trained_model

REPO = Path(__file__).resolve().parents[2]


# Without low-quality matches the matcher is the paper's rule, which the tests recompute.
PAPER_MATCHER = ["model.matcher.allow_low_quality_matches=false"]
NUM_CLASSES = 7


def test_sample_image_indices_is_a_seeded_sample_without_replacement():
    first = sample_image_indices(100, 10, seed=3)
    assert first == sample_image_indices(100, 10, seed=3)
    assert first != sample_image_indices(100, 10, seed=4)
    assert first == sorted(set(first)) and len(first) == 10
    assert 0 <= first[0] and first[-1] < 100
    assert sample_image_indices(5, None, seed=0) == [0, 1, 2, 3, 4]
    assert sample_image_indices(5, 5, seed=0) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="only 5 are available"):
        sample_image_indices(5, 6, seed=0)
    with pytest.raises(ValueError, match=">= 1"):
        sample_image_indices(5, 0, seed=0)


def test_anchors_in_padding_compares_centres_with_each_image_size():
    # Centres (x, y): (5, 5), (15, 5), (5, 25), (19.5, 29.5).
    anchors = torch.tensor(
        [[0, 0, 10, 10], [10, 0, 20, 10], [0, 20, 10, 30], [19, 29, 20, 30]], dtype=torch.float32
    )
    image_sizes = torch.tensor([[32, 32], [30, 16], [20, 20]])  # (H, W)
    expected = torch.tensor(
        [
            [False, False, False, False],
            [False, False, False, True],  # x 19.5 >= W 16
            [False, False, True, True],  # y 25 >= H 20
        ]
    )
    assert torch.equal(anchors_in_padding(anchors, image_sizes), expected)


def _paper_labels(anchors, boxes, labels):
    """(A,) class / -1 / -2 by the paper's rule, from torchvision's IoU."""
    best_iou, best_box = box_iou(boxes, anchors).max(dim=0)
    result = torch.full((len(anchors),), -2, dtype=torch.int64)
    result[best_iou < 0.4] = -1
    result[best_iou >= 0.5] = labels[best_box[best_iou >= 0.5]]
    return result


def _one_image(model, dataset, index):
    """Logits (A, K) and paper-rule labels (A,) of image `index`, computed here directly."""
    item = dataset[index]
    assert len(item["crowd_boxes"]) == 0 and len(item["boxes"]) > 0
    batch = collate_detection([item], size_divisibility=32)
    assert torch.equal(batch.image_sizes[0], torch.tensor(batch.images.shape[-2:]))  # no padding
    with torch.no_grad():
        outputs = model(batch.images, batch.image_sizes)
    return outputs.cls_logits[0], _paper_labels(outputs.anchors, item["boxes"], item["labels"])


def _exact_curve(losses, fraction):
    ordered = np.sort(losses)
    cumulative = np.concatenate([[0.0], np.cumsum(ordered)])
    return np.interp(
        fraction, np.arange(len(ordered) + 1) / len(ordered), cumulative / cumulative[-1]
    )


def test_tool_writes_curves_of_the_matched_anchors_of_the_sampled_image(
    tiny_checkpoint, tmp_path, capsys
):
    out = tmp_path / "loss"
    args = ["--weights", str(tiny_checkpoint), "--output-dir", str(out), "--device", "cpu"]
    assert cli(["analyze-loss", *args, "--num-images", "1", "--seed", "5", *PAPER_MATCHER]) == 0
    printed = capsys.readouterr().out
    assert "hardest 10%" in printed and "foreground" in printed

    for name in ("loss_cdf.csv", "loss_cdf.png", "loss_cdf_summary.json", "loss_vs_pt.png"):
        assert (out / name).stat().st_size > 0, name
    study = json.loads((out / "loss_study.json").read_text())
    summary = json.loads((out / "loss_cdf_summary.json").read_text())
    with open(out / "loss_cdf.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["gamma", "kind", "fraction_of_samples", "cumulative_loss"]

    # The sampled image, labelled independently.
    model, cfg, _ = load_trained_model(tiny_checkpoint, overrides=PAPER_MATCHER)
    dataset = build_dataset(resolve_data_paths(cfg), "val", training=False)
    [index] = sample_image_indices(len(dataset), 1, seed=5)
    assert study["image_ids"] == [dataset.image_ids[index]]
    logits, labels = _one_image(model, dataset, index)
    num_foreground = int((labels >= 0).sum())
    num_background = int((labels == -1).sum())
    assert num_foreground > 0
    assert study["anchors"] == {
        "foreground": num_foreground,
        "background": num_background,
        "ignored": int((labels == -2).sum()),
        "padding_left_out": 0,
    }

    curves = {}
    for row in rows:
        curves.setdefault((float(row["gamma"]), row["kind"]), []).append(
            (float(row["fraction_of_samples"]), float(row["cumulative_loss"]))
        )
    assert sorted(curves) == sorted(
        (g, k) for g in (0, 0.5, 1, 2) for k in ("foreground", "background")
    )
    for record in summary["curves"]:
        key = (record["gamma"], record["kind"])
        expected_count = num_foreground if record["kind"] == "foreground" else num_background
        assert record["num_samples"] == expected_count, key
        curve = np.array(curves[key])
        assert curve[0].tolist() == [0.0, 0.0] and curve[-1].tolist() == [1.0, 1.0], key
        assert (np.diff(curve[:, 1]) >= 0).all(), key

    # The gamma = 2 curves against the focal losses computed here from the logits.
    gamma = 2.0
    p = torch.sigmoid(logits.double())
    fg = labels >= 0
    p_t = p[fg].gather(1, labels[fg, None]).squeeze(1)
    expected = {
        "foreground": (-((1 - p_t) ** gamma) * torch.log(p_t)).numpy(),
        "background": (-(p[labels == -1] ** gamma) * torch.log1p(-p[labels == -1]))
        .sum(dim=1)
        .numpy(),
    }
    for record in summary["curves"]:
        if record["gamma"] != gamma:
            continue
        curve = np.array(curves[(gamma, record["kind"])])
        exact = _exact_curve(expected[record["kind"]], curve[:, 0])
        # The histogram curve is exact at bin edges; in between it is within the stated bound
        # (plus the float32 rounding of the logits).
        tolerance = record["curve_error_bound"] + 1e-5
        assert np.abs(curve[:, 1] - exact).max() <= tolerance, record["kind"]
        assert record["total_loss"] == pytest.approx(expected[record["kind"]].sum(), rel=1e-5)


def test_binary_view_counts_every_negative_class_pair(tiny_checkpoint):
    model, cfg, _ = load_trained_model(tiny_checkpoint, overrides=PAPER_MATCHER)
    dataset = build_dataset(resolve_data_paths(cfg), "val", training=False)
    loader = create_test_loader(Subset(dataset, [0, 1]), batch_size=2, size_divisibility=32)
    study = collect_loss_distribution(model, loader, torch.device("cpu"), [0.0], "binary")
    per_image = [_one_image(model, dataset, i) for i in (0, 1)]
    logits = torch.cat([image_logits for image_logits, _ in per_image]).double()
    labels = torch.cat([image_labels for _, image_labels in per_image])
    num_foreground = int((labels >= 0).sum())
    num_background = int((labels == -1).sum())
    assert study.image_ids == dataset.image_ids[:2]
    assert study.distribution.histogram(0.0, "foreground").num_samples == num_foreground
    assert study.distribution.histogram(
        0.0, "background"
    ).num_samples == num_background * NUM_CLASSES + num_foreground * (NUM_CLASSES - 1)
    # gamma = 0 is the binary cross entropy: the totals are the summed BCE of each kind.
    targets = F.one_hot(labels.clamp(min=0), NUM_CLASSES).double() * (labels >= 0)[:, None]
    kept = labels != -2
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")[kept]
    positive = targets[kept].bool()
    assert study.distribution.histogram(0.0, "foreground").total_loss == pytest.approx(
        bce[positive].sum().item(), rel=1e-5
    )
    assert study.distribution.histogram(0.0, "background").total_loss == pytest.approx(
        bce[~positive].sum().item(), rel=1e-5
    )


def test_background_anchors_in_batch_padding_are_left_out(tiny_checkpoint):
    model, cfg, _ = load_trained_model(tiny_checkpoint, overrides=PAPER_MATCHER)
    dataset = build_dataset(resolve_data_paths(cfg), "val", training=False)

    def study(size_divisibility):
        loader = create_test_loader(Subset(dataset, [0]), size_divisibility=size_divisibility)
        return collect_loss_distribution(model, loader, torch.device("cpu"), gammas=[2.0])

    tight = study(32)
    # Padding the 64-pixel image to 128 adds anchors in the padding, all of them background.
    padded = study(128)
    assert tight.anchors.padding == 0 and padded.anchors.padding > 0
    assert padded.anchors.foreground == tight.anchors.foreground
    assert padded.anchors.background == tight.anchors.background


def test_tool_errors_name_the_problem(tiny_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli(["analyze-loss", "--weights", str(tmp_path / "nope.pth"), "--output-dir", out]) == 1
    assert "nope.pth" in capsys.readouterr().err

    args = ["--weights", str(tiny_checkpoint), "--output-dir", out, "--device", "cpu"]
    assert cli(["analyze-loss", *args, "--num-images", "9"]) == 1
    err = capsys.readouterr().err
    assert "split 'val'" in err and "only 8 are available" in err

    # Thresholds no anchor can reach: no foreground anchors at all.
    unreachable = [
        "model.matcher.fg_iou_threshold=1.0",
        "model.matcher.bg_iou_threshold=1.0",
        *PAPER_MATCHER,
    ]
    assert cli(["analyze-loss", *args, "--num-images", "2", "--split", "train", *unreachable]) == 1
    err = capsys.readouterr().err
    assert "no foreground anchors in the 2 images of split 'train'" in err
