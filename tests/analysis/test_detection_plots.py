"""Evaluation pictures: the confusion matrix against hand-computed cases and a one-at-a-time
greedy matcher, the PR curves against COCOeval's AP numbers, and the files `retinanet eval`
writes."""

import json

import cv2
import numpy as np
import pytest

from retinanet.analysis.confusion_matrix import (
    _match_greedy,
    dataset_confusion,
    image_confusion,
    plot_confusion,
    read_confusion_csv,
)
from retinanet.analysis.detection_plots import write_detection_plots
from retinanet.analysis.pr_curves import plot_pr_curves, pr_curves
from retinanet.cli import main as cli
from retinanet.data.coco import CocoDetection
from retinanet.engine.coco_metrics import PrecisionArray, evaluate_coco


def test_confusion_matrix_of_a_hand_computed_image():
    # 3 classes; column/row 3 is background.
    gt_boxes = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]]
    gt_labels = [0, 1, 2, 0]
    det_boxes = [
        [0, 0, 10, 10],  # on box 0, right class                    -> [0, 0]
        [0, 0, 10, 9],  # on box 0 again, class 1: a duplicate      -> [3, 1]
        [20, 0, 30, 11],  # on box 1 as class 2: a confusion        -> [1, 2]
        [60, 0, 66, 10],  # box 3 at IoU 0.6 as class 0             -> [0, 0]
        [100, 100, 110, 110],  # on nothing, class 2                -> [3, 2]
        [201, 1, 205, 5],  # inside the crowd region: not counted
    ]
    det_labels = [0, 1, 2, 0, 2, 1]
    crowd = [[200, 0, 260, 10]]
    matrix = image_confusion(gt_boxes, gt_labels, det_boxes, det_labels, 3, 0.5, crowd)
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0] = 2
    expected[3, 1] = 1
    expected[1, 2] = 1
    expected[2, 3] = 1  # box 2 missed
    expected[3, 2] = 1
    np.testing.assert_array_equal(matrix, expected)
    # every box is counted once in its row, every counted detection once in its column
    assert matrix[:3].sum() == 4 and matrix[:, :3].sum() == 5


def test_own_class_is_matched_before_a_better_overlapping_other_class():
    gt = [[0, 0, 10, 10]]
    # class 1 overlaps more (IoU 0.9) but class 0 (IoU 0.6) is the box's own class
    dets = [[0, 0, 10, 9], [0, 0, 6, 10]]
    matrix = image_confusion(gt, [0], dets, [1, 0], 2, 0.5)
    np.testing.assert_array_equal(matrix, [[1, 0, 0], [0, 0, 0], [0, 1, 0]])


def test_empty_image_and_no_detections():
    assert image_confusion([], [], [], [], 2).sum() == 0
    np.testing.assert_array_equal(
        image_confusion([[0, 0, 5, 5]], [1], [], [], 2), [[0, 0, 0], [0, 0, 1], [0, 0, 0]]
    )
    np.testing.assert_array_equal(
        image_confusion([], [], [[0, 0, 5, 5]], [0], 2), [[0, 0, 0], [0, 0, 0], [1, 0, 0]]
    )


def _greedy_one_at_a_time(iou: np.ndarray, allowed: np.ndarray) -> list[tuple[int, int]]:
    score = np.where(allowed, iou, -1.0)
    pairs = []
    while score.size and score.max() >= 0:
        g, d = np.unravel_index(score.argmax(), score.shape)
        pairs.append((int(g), int(d)))
        score[g, :] = -1
        score[:, d] = -1
    return sorted(pairs)


def test_matching_rounds_equal_taking_the_highest_pair_one_at_a_time():
    rng = np.random.default_rng(0)
    for _ in range(200):
        g, d = rng.integers(0, 8, size=2)
        iou = np.round(rng.random((g, d)), 1)  # rounded: ties happen
        allowed = iou >= 0.3
        gt_match, det_match = np.full(g, -1), np.full(d, -1)
        _match_greedy(iou, allowed, gt_match, det_match)
        got = sorted((int(i), int(j)) for i, j in enumerate(gt_match) if j >= 0)
        want = _greedy_one_at_a_time(iou, allowed)
        # with ties either pair may win; the number of pairs and their IoUs agree
        assert len(got) == len(want)
        assert sorted(iou[i, j] for i, j in got) == sorted(iou[i, j] for i, j in want)
        assert all(det_match[j] == i for i, j in got)


# ------------------------------------------------------------------------------------------
# A small COCO dataset with noisy detections
# ------------------------------------------------------------------------------------------

NAMES = ["circle", "square", "star", "unused"]


@pytest.fixture
def dataset_and_results(tmp_path) -> tuple[CocoDetection, list[dict]]:
    """12 images with 1-4 boxes of 3 classes (the 4th category has no box), and results:
    each box detected with jitter, sometimes as another class, plus false alarms."""
    rng = np.random.default_rng(1)
    images, annotations, results = [], [], []
    (tmp_path / "images").mkdir()
    for image_id in range(1, 13):
        cv2.imwrite(str(tmp_path / "images" / f"{image_id}.png"), np.zeros((96, 128, 3), np.uint8))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 128, "height": 96})
        for _ in range(rng.integers(1, 5)):
            w, h = rng.uniform(10, 40, size=2)
            x, y = rng.uniform(0, 128 - w), rng.uniform(0, 96 - h)
            category = int(rng.integers(1, 4))
            ann_id = len(annotations) + 1
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            detected = category if rng.random() < 0.8 else int(rng.integers(1, 4))
            jitter = rng.normal(0, 3, size=4)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": detected,
                    "bbox": [x + jitter[0], y + jitter[1], w, h],
                    "score": float(rng.random()),
                }
            )
        for _ in range(2):  # false alarms
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": list(rng.uniform(0, 60, size=4) + [0, 0, 5, 5]),
                    "score": float(rng.random()),
                }
            )
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(NAMES)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    return CocoDetection(tmp_path / "images", tmp_path / "instances.json"), results


def test_pr_curves_average_to_cocoeval_ap(dataset_and_results):
    dataset, results = dataset_and_results
    metrics = evaluate_coco(dataset.coco, results)
    curves = pr_curves(metrics.precision, NAMES)
    assert metrics.precision.values.shape == (10, 101, 4) and curves.precision.shape == (4, 101)
    for k, category in enumerate(metrics.per_category):
        assert category.category_id == curves.category_ids[k]
        if category.num_gt == 0:
            assert np.isnan(curves.ap[k]) and np.isnan(category.AP)
            continue
        assert curves.ap[k] == pytest.approx(category.AP, abs=1e-12)
        assert curves.ap50[k] == pytest.approx(category.AP50, abs=1e-12)
        # interpolated precision never rises with recall
        assert (np.diff(curves.precision50[k]) <= 1e-12).all()
    assert np.nanmean(curves.ap) == pytest.approx(metrics.AP, abs=1e-12)
    assert 0.1 < metrics.AP < 0.9  # a non-trivial case


def test_write_detection_plots_writes_consistent_files(dataset_and_results, tmp_path):
    dataset, results = dataset_and_results
    out = tmp_path / "eval"
    metrics = evaluate_coco(dataset.coco, results)
    plots = write_detection_plots(out, dataset, results, metrics, score_threshold=0.3)
    for name in ("pr_curves.png", "pr_curves.csv", "confusion_matrix.csv", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 0, name
    matrix, names = read_confusion_csv(out / "confusion_matrix.csv")
    assert names == NAMES
    np.testing.assert_array_equal(matrix, plots.matrix)
    np.testing.assert_array_equal(matrix, dataset_confusion(dataset, results, 0.3))
    # rows: every GT box once; columns: every detection scoring >= 0.3 once (no crowd here)
    gt_per_class = np.bincount(
        [a["category_id"] - 1 for a in dataset.coco.dataset["annotations"]], minlength=4
    )
    np.testing.assert_array_equal(matrix[:4].sum(axis=1), gt_per_class)
    kept = [r for r in results if r["score"] >= 0.3]
    assert matrix[:, :4].sum() == len(kept)
    assert matrix[4, 4] == 0 and matrix.trace() > 0
    rows = (out / "pr_curves.csv").read_text().splitlines()
    assert rows[0] == "category_id,name,iou,recall,precision"
    assert len(rows) == 1 + 3 * 2 * 101  # 3 classes with GT, 2 IoU settings, 101 recalls


def test_pictures_stay_readable_for_80_classes(tmp_path):
    names = [f"class_{i}" for i in range(80)]
    matrix = np.random.default_rng(0).integers(0, 20, size=(81, 81))
    figure = plot_confusion(tmp_path / "cm.png", matrix, names, 0.5)
    height, width = cv2.imread(str(tmp_path / "cm.png")).shape[:2]
    assert min(height, width) >= 81 * 25  # at least 25 px per cell for the tick labels
    assert figure.axes[0].get_xticklabels()[0].get_fontsize() >= 6

    precision = np.random.default_rng(0).random((10, 101, 80))
    precision = -np.sort(-precision, axis=1)
    array = PrecisionArray(
        precision, np.linspace(0.5, 0.95, 10), np.linspace(0, 1, 101), tuple(range(80))
    )
    curves = pr_curves(array, names)
    figure = plot_pr_curves(tmp_path / "pr.png", curves)
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert len(visible) == 81  # the mean and one panel per class
    height, width = cv2.imread(str(tmp_path / "pr.png")).shape[:2]
    assert min(height, width) / 9 >= 150  # a 9 x 9 grid of panels of at least 150 px


def test_eval_command_writes_the_pictures(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--weights", str(tiny_checkpoint), "--output-dir", str(out), "--device", "cpu"]
    assert cli(["eval", *args, "--confusion-score-threshold", "0.9"]) == 0
    assert "AP " in capsys.readouterr().out
    matrix, names = read_confusion_csv(out / "confusion_matrix.csv")
    assert len(names) == 7 and matrix.shape == (8, 8)
    assert (out / "pr_curves.png").is_file() and (out / "confusion_matrix.png").is_file()
    results = json.loads((out / "coco_results.json").read_text())
    assert matrix[:, :7].sum() == sum(r["score"] >= 0.9 for r in results)
