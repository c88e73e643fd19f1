import contextlib
import io
import json
import math

import matplotlib.image
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet.analysis.calibration import (
    apply_temperature,
    calibration_metrics,
    fit_isotonic,
    fit_temperature,
    match_detections_to_gt,
    reliability_diagram,
    scores_to_logits,
    split_image_ids,
)
from retinanet.engine.coco_metrics import SUMMARY_NAMES, evaluate_coco

GT_BOX = [0.0, 0.0, 10.0, 10.0]


def match(det_boxes, det_scores, det_labels, gt_boxes, gt_labels, gt_iscrowd=None, **kwargs):
    result = match_detections_to_gt(
        np.array(det_boxes, dtype=np.float64).reshape(-1, 4),
        np.array(det_scores, dtype=np.float64),
        np.array(det_labels, dtype=np.int64),
        np.array(gt_boxes, dtype=np.float64).reshape(-1, 4),
        np.array(gt_labels, dtype=np.int64),
        None if gt_iscrowd is None else np.array(gt_iscrowd, dtype=bool),
        **kwargs,
    )
    return result.correct.tolist(), result.ignored.tolist()


# ----------------------------------------------------------------------------- matching


def test_duplicate_detections_give_one_true_positive_to_the_higher_score():
    # Input order puts the lower score first: the higher score must still win the box.
    correct, ignored = match([[0, 0, 10, 9], [0, 0, 10, 10]], [0.4, 0.9], [0, 0], [GT_BOX], [0])
    assert correct == [False, True]
    assert ignored == [False, False]


def test_detection_of_another_class_is_a_false_positive():
    assert match([GT_BOX], [0.9], [1], [GT_BOX], [0]) == ([False], [False])
    assert match([GT_BOX, GT_BOX], [0.9, 0.8], [1, 0], [GT_BOX], [0]) == (
        [False, True],
        [False, False],
    )


def test_iou_threshold_half_versus_three_quarters():
    # [0, 0, 10, 6] covers 60 of the GT's 100 px^2 and lies inside it: IoU 0.6.
    assert match([[0, 0, 10, 6]], [0.9], [0], [GT_BOX], [0]) == ([True], [False])
    assert match([[0, 0, 10, 6]], [0.9], [0], [GT_BOX], [0], iou_threshold=0.75) == (
        [False],
        [False],
    )
    assert match([[0, 0, 10, 8]], [0.9], [0], [GT_BOX], [0], iou_threshold=0.75) == (
        [True],
        [False],
    )


def test_crowd_region_absorbs_detections_without_counting_them():
    crowd = [0, 0, 100, 100]
    # Both detections lie inside the crowd box: IoU 0.01 but intersection / det area = 1.
    correct, ignored = match(
        [[10, 10, 20, 20], [50, 50, 60, 60], [90, 90, 110, 110]],
        [0.9, 0.8, 0.7],
        [0, 0, 0],
        [crowd],
        [0],
        [True],
    )
    assert correct == [False, False, False]
    # The third has only a quarter of its area in the crowd box.
    assert ignored == [True, True, False]
    # A crowd box of another class ignores nothing.
    assert match([[10, 10, 20, 20]], [0.9], [1], [crowd], [0], [True]) == ([False], [False])


def test_regular_box_is_preferred_over_crowd_and_crowd_takes_the_duplicate():
    crowd = [0, 0, 100, 100]
    person = [10, 10, 20, 20]
    correct, ignored = match(
        [person, person], [0.9, 0.8], [0, 0], [crowd, person], [0, 0], [True, False]
    )
    assert correct == [True, False]
    assert ignored == [False, True]


def test_matching_is_greedy_by_score_not_optimal():
    # The first detection takes box A (IoU 90/110 beats 80/120 with B), leaving the second
    # (IoU 80/120 with A, 50/150 with B) unmatched, though first-B and second-A would match both.
    box_a = [0, 0, 10, 10]
    box_b = [3, 0, 13, 10]
    first = [1, 0, 11, 10]
    second = [-2, 0, 8, 10]
    ious = _pairwise_iou(np.array([first, second]), np.array([box_a, box_b]))
    assert ious[0, 0] > ious[0, 1] >= 0.5 and ious[1, 0] >= 0.5 > ious[1, 1]
    assert match([first, second], [0.9, 0.8], [0, 0], [box_a, box_b], [0, 0]) == (
        [True, False],
        [False, False],
    )


def test_matching_handles_empty_inputs():
    assert match([], [], [], [GT_BOX], [0]) == ([], [])
    assert match([GT_BOX, GT_BOX], [0.5, 0.6], [0, 0], [], []) == ([False, False], [False, False])


def test_matching_agrees_with_pycocotools_evaluate_img(coco_tiny_dir):
    """Per detection, correct = matched and not ignored and ignored = dtIgnore in pycocotools'
    evaluateImg (area 'all', no detection cap), at IoU 0.5 and 0.75, on real boxes and crowds."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco_tiny_dir / "annotations" / "instances_val2017.json"))
        results = _jittered_results(gt, seed=0)
        detections = gt.loadRes(results)
        coco_eval = COCOeval(gt, detections, "bbox")
        coco_eval.params.maxDets = [1, 10, 10_000]
        coco_eval.params.areaRng = [[0, 1e10]]
        coco_eval.params.areaRngLbl = ["all"]
        coco_eval.evaluate()
    thresholds = list(coco_eval.params.iouThrs)
    reference = {}  # (threshold index, detection id) -> (correct, ignored)
    for entry in coco_eval.evalImgs:
        if entry is None:
            continue
        for t in (0, 5):
            for k, det_id in enumerate(entry["dtIds"]):
                ignored = bool(entry["dtIgnore"][t, k])
                reference[t, det_id] = (bool(entry["dtMatches"][t, k] > 0) and not ignored, ignored)

    counts = {True: 0, False: 0, "ignored": 0}
    for image_id in gt.getImgIds():
        gts = gt.loadAnns(gt.getAnnIds(imgIds=image_id))
        dets = detections.loadAnns(detections.getAnnIds(imgIds=image_id))
        if not dets:
            continue
        for t in (0, 5):
            got = match_detections_to_gt(
                _xyxy([d["bbox"] for d in dets]),
                np.array([d["score"] for d in dets]),
                np.array([d["category_id"] for d in dets]),
                _xyxy([g["bbox"] for g in gts]),
                np.array([g["category_id"] for g in gts], dtype=np.int64),
                np.array([g["iscrowd"] for g in gts], dtype=bool),
                iou_threshold=thresholds[t],
            )
            expected = [reference[t, d["id"]] for d in dets]
            assert list(zip(got.correct.tolist(), got.ignored.tolist(), strict=True)) == expected
            counts[True] += int(got.correct.sum())
            counts[False] += int((~got.correct & ~got.ignored).sum())
            counts["ignored"] += int(got.ignored.sum())
    # The comparison covered every outcome.
    assert min(counts.values()) > 5


# ----------------------------------------------------------------------------- D-ECE


def test_perfectly_calibrated_scores_have_zero_d_ece():
    # In each bin, n detections at confidences averaging exactly c, of which c * n are correct.
    rng = np.random.default_rng(0)
    confidences, correct = [], []
    for mean in (0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95):
        n = 40
        offsets = rng.uniform(-0.02, 0.02, n // 2)
        confidences += [*(mean + offsets), *(mean - offsets)]  # mean exactly `mean`
        hits = round(mean * n)
        correct += [True] * hits + [False] * (n - hits)
    result = calibration_metrics(np.array(confidences), np.array(correct), num_bins=7)
    assert result.d_ece == pytest.approx(0.0, abs=1e-12)
    assert result.mce == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(result.precision, result.mean_confidence, atol=1e-12)


def test_hand_computed_d_ece_mce_and_brier():
    confidences = np.array([0.15, 0.18, 0.62, 0.65, 0.68, 0.95])
    correct = np.array([0, 0, 1, 0, 1, 1])
    result = calibration_metrics(confidences, correct, num_bins=10, min_score=0.0)
    # Bins of width 0.1: [0.1, 0.2) holds 2 (mean 0.165, precision 0, gap 0.165),
    # [0.6, 0.7) holds 3 (mean 0.65, precision 2/3, gap 1/60), [0.9, 1] holds 1 (gap 0.05).
    assert result.counts.tolist() == [0, 2, 0, 0, 0, 0, 3, 0, 0, 1]
    assert result.mean_confidence[[1, 6, 9]] == pytest.approx([0.165, 0.65, 0.95])
    assert result.precision[[1, 6, 9]] == pytest.approx([0.0, 2 / 3, 1.0])
    assert np.isnan(result.precision[0]) and np.isnan(result.mean_confidence[0])
    assert result.d_ece == pytest.approx((2 * 0.165 + 3 / 60 + 0.05) / 6)
    assert result.mce == pytest.approx(0.165)
    squared = [0.15**2, 0.18**2, 0.38**2, 0.65**2, 0.32**2, 0.05**2]
    assert result.brier == pytest.approx(sum(squared) / 6)
    assert result.num_detections == 6


def test_bins_span_min_score_to_one_and_drop_lower_scores():
    confidences = np.array([0.1, 0.29, 0.3, 0.5, 1.0])
    result = calibration_metrics(confidences, np.array([1, 1, 0, 1, 1]), num_bins=10)
    np.testing.assert_allclose(result.bin_edges, np.linspace(0.3, 1.0, 11))
    assert result.num_detections == 3
    assert result.counts.sum() == 3
    assert result.counts[0] == 1 and result.counts[-1] == 1  # 0.3 in the first, 1.0 in the last
    assert result.brier == pytest.approx((0.3**2 + 0.5**2 + 0.0) / 3)

    full = calibration_metrics(confidences, np.array([1, 1, 0, 1, 1]), 20, full_range_bins=True)
    np.testing.assert_allclose(full.bin_edges, np.linspace(0.0, 1.0, 21))
    assert full.counts.sum() == 3 and full.counts[:6].sum() == 0


def test_no_detection_above_min_score_gives_nan():
    result = calibration_metrics(np.array([0.1, 0.2]), np.array([True, False]))
    assert result.num_detections == 0 and result.counts.sum() == 0
    assert math.isnan(result.d_ece) and math.isnan(result.mce) and math.isnan(result.brier)


def test_calibration_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="lie in"):
        calibration_metrics(np.array([1.2]), np.array([True]))
    with pytest.raises(ValueError, match="correct must have shape"):
        calibration_metrics(np.array([0.5, 0.6]), np.array([True]))
    with pytest.raises(ValueError, match="boolean or 0/1"):
        calibration_metrics(np.array([0.5]), np.array([2]))


@pytest.mark.parametrize("empty", [False, True])
def test_reliability_diagram_writes_a_png(tmp_path, empty):
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.3, 1.0, 500)
    correct = rng.random(500) < confidences**2
    if empty:
        confidences, correct = confidences[:0], correct[:0]
    result = calibration_metrics(confidences, correct)
    path = tmp_path / "plots" / "reliability.png"
    reliability_diagram(result, path, title="val2017, IoU 0.5")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > image.shape[1] > 300
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]  # no temporary left


# ----------------------------------------------------------------------------- split


def test_split_is_disjoint_complete_and_reproducible():
    ids = list(range(1000, 1100))
    fit, held_out = split_image_ids(ids, fraction=0.3, seed=5)
    assert len(fit) == 30 and len(held_out) == 70
    assert set(fit).isdisjoint(held_out) and set(fit) | set(held_out) == set(ids)
    assert fit == sorted(fit)
    assert split_image_ids(ids[::-1], 0.3, seed=5) == (fit, held_out)
    assert split_image_ids(ids, 0.3, seed=6) != (fit, held_out)
    assert split_image_ids([1, 2], 0.01, seed=0)[0] != []  # at least one image on each side
    with pytest.raises(ValueError, match="image id 3 appears more than once"):
        split_image_ids([1, 3, 3], 0.5, seed=0)
    with pytest.raises(ValueError, match="fraction"):
        split_image_ids([1, 2, 3], 1.0, seed=0)


# ----------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_fit_temperature_recovers_known_temperature(true_temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, 200_000)
    correct = rng.random(len(logits)) < 1.0 / (1.0 + np.exp(-logits / true_temperature))
    temperature = fit_temperature(logits, correct)
    assert temperature == pytest.approx(true_temperature, rel=0.05)

    def nll(t):
        p = np.clip(1.0 / (1.0 + np.exp(-logits / t)), 1e-15, 1 - 1e-15)
        return -np.mean(np.where(correct, np.log(p), np.log1p(-p)))

    assert nll(temperature) < min(nll(temperature * 0.99), nll(temperature * 1.01))


def test_fit_temperature_rejects_uninformative_and_separable_scores():
    logits = np.array([-2.0, -1.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="not positively related"):
        fit_temperature(logits, np.array([True, True, False, False]))
    with pytest.raises(ValueError, match="not positively related"):
        fit_temperature(np.zeros(4), np.array([True, True, False, False]))
    # Every correct logit >= 0 and every wrong one <= 0: the NLL falls forever as T -> 0.
    with pytest.raises(ValueError, match="separate correct from wrong"):
        fit_temperature(logits, np.array([False, False, True, True]))
    with pytest.raises(ValueError, match="separate correct from wrong"):
        fit_temperature(np.array([1.0, 3.0]), np.array([True, True]))
    # One correct detection with a negative logit makes the optimum finite again.
    assert 0 < fit_temperature(np.array([-0.5, 1.0, 3.0]), np.array([True, True, True])) < 10


def test_apply_temperature_is_strictly_monotone_and_identity_at_one():
    rng = np.random.default_rng(0)
    scores = np.unique(rng.uniform(1e-3, 1 - 1e-3, 1000).astype(np.float32)).astype(np.float64)
    assert apply_temperature(scores, 1.0) == pytest.approx(scores, rel=1e-12)
    for temperature in (0.5, 3.0):
        assert (np.diff(apply_temperature(scores, temperature)) > 0).all()
    # Softening stays strictly increasing from LOGIT_EPS (where 0 is clipped to) up to 1,
    # including the largest float32 below 1.
    extremes = np.array([0.0, 1e-11, 1e-7, 0.5, np.nextafter(np.float32(1), np.float32(0)), 1.0])
    assert (np.diff(apply_temperature(extremes, 2.0)) > 0).all()
    assert scores_to_logits(np.array([0.5, 0.75])) == pytest.approx([0.0, math.log(3.0)])
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(scores, 0.0)


def test_temperature_scaling_leaves_coco_ap_unchanged(cocoapi_fake_dir):
    gt_path = cocoapi_fake_dir / "instances_val2014_100.json"
    with open(cocoapi_fake_dir / "results" / "instances_val2014_fakebbox100_results.json") as f:
        results = json.load(f)
    scaled_scores = apply_temperature(np.array([r["score"] for r in results]), 0.3)
    scaled = [{**r, "score": s} for r, s in zip(results, scaled_scores.tolist(), strict=True)]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(results, scaled, strict=True)) > 0.1
    before, after = evaluate_coco(gt_path, results), evaluate_coco(gt_path, scaled)
    assert [getattr(after, n) for n in SUMMARY_NAMES] == [getattr(before, n) for n in SUMMARY_NAMES]


# ----------------------------------------------------------------------------- isotonic


def test_isotonic_pools_adjacent_violators_by_hand():
    # Pooling 1,0 -> 0.5; then 1,0 -> 0.5; then 0.5,0 -> 1/3 < 0.5 pools all five: 2/5.
    calibrator = fit_isotonic(np.arange(1.0, 7.0), np.array([1, 0, 1, 0, 0, 1]), "step")
    assert calibrator.apply(np.arange(1.0, 7.0)) == pytest.approx([0.4] * 5 + [1.0])
    assert calibrator.knot_scores.tolist() == [1.0, 6.0]
    assert calibrator.apply(np.array([0.0, 5.99, 100.0])) == pytest.approx([0.4, 0.4, 1.0])

    linear = fit_isotonic(np.arange(1.0, 7.0), np.array([1, 0, 1, 0, 0, 1]))
    assert linear.knot_scores.tolist() == [1.0, 5.0, 6.0]
    assert linear.apply(np.array([3.0, 5.5, 7.0])) == pytest.approx([0.4, 0.7, 1.0])


def test_isotonic_equal_scores_share_one_value():
    calibrator = fit_isotonic(np.array([0.5, 0.5, 0.5, 0.9]), np.array([1, 0, 0, 1]))
    assert calibrator.apply(np.array([0.5, 0.9])) == pytest.approx([1 / 3, 1.0])


@pytest.mark.parametrize("seed", range(5))
def test_isotonic_matches_min_max_formula(seed):
    # Isotonic regression at point i is max over j <= i of min over k >= i of mean(y[j..k]).
    rng = np.random.default_rng(seed)
    scores = rng.permutation(12).astype(np.float64)
    correct = rng.random(12) < 0.5
    order = np.argsort(scores)
    y = correct[order].astype(np.float64)
    expected = [
        max(min(y[j : k + 1].mean() for k in range(i, 12)) for j in range(i + 1)) for i in range(12)
    ]
    fitted = fit_isotonic(scores, correct, "step").apply(scores[order])
    assert fitted == pytest.approx(expected, abs=1e-12)


def test_isotonic_is_monotone_and_fixes_miscalibration_on_held_out_data():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.3, 1.0, 40_000)
    correct = rng.random(len(scores)) < scores**3  # overconfident
    fit_part, eval_part = slice(0, 20_000), slice(20_000, None)
    calibrator = fit_isotonic(scores[fit_part], correct[fit_part])

    grid = np.linspace(0.0, 1.2, 500)
    calibrated_grid = calibrator.apply(grid)
    assert (np.diff(calibrated_grid) >= 0).all()
    assert calibrated_grid.min() >= 0.0 and calibrated_grid.max() <= 1.0

    before = calibration_metrics(scores[eval_part], correct[eval_part], min_score=0.0)
    after = calibration_metrics(
        calibrator.apply(scores[eval_part]), correct[eval_part], min_score=0.0
    )
    assert before.d_ece > 0.15
    assert after.d_ece < 0.03
    assert after.brier < before.brier


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _xyxy(xywh: list) -> np.ndarray:
    boxes = np.array(xywh, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def _jittered_results(gt: COCO, seed: int) -> list[dict]:
    """Two jittered copies of each GT box (crowds included) with random scores, some with the
    class changed, so that TPs, duplicates, class errors and crowd hits all occur."""
    rng = np.random.default_rng(seed)
    category_ids = gt.getCatIds()
    results = []
    for ann in gt.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        for _ in range(2):
            dx, dy, dw, dh = rng.normal(0.0, 0.1, 4) * [w, h, w, h]
            category = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(category_ids))
            results.append(
                {
                    "image_id": ann["image_id"],
                    "category_id": category,
                    "bbox": [x + dx, y + dy, max(w + dw, 1.0), max(h + dh, 1.0)],
                    "score": float(rng.random()),
                }
            )
    return results
