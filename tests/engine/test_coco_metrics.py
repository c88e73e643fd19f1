import contextlib
import copy
import io
import json
import math
import sys

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet.engine.coco_metrics import (
    METRICS_FILENAME,
    RESULTS_FILENAME,
    SUMMARY_NAMES,
    CocoMetrics,
    detections_to_coco_results,
    evaluate_coco,
    format_category_table,
    write_evaluation,
)

TOLERANCE = 1e-12


@pytest.fixture(scope="module")
def fake_files(cocoapi_fake_dir):
    return (
        cocoapi_fake_dir / "instances_val2014_100.json",
        cocoapi_fake_dir / "results" / "instances_val2014_fakebbox100_results.json",
    )


@pytest.fixture(scope="module")
def tiny_gt_path(coco_tiny_dir):
    return coco_tiny_dir / "annotations" / "instances_val2017.json"


@pytest.fixture(scope="module")
def tiny_gt(tiny_gt_path):
    with open(tiny_gt_path) as f:
        return json.load(f)


def perturbed_results(gt: dict, seed: int) -> list[dict]:
    """Three jittered copies of every GT box with random scores, a tenth of them given a wrong
    class, plus random boxes: a result set with TPs at every IoU, FPs and duplicates."""
    rng = np.random.default_rng(seed)
    anns = gt["annotations"]
    category_ids = np.array([c["id"] for c in gt["categories"]])
    image_ids = np.array([image["id"] for image in gt["images"]])
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float64)  # xywh
    copies = 3
    scale = np.tile(boxes[:, 2:], 2)
    jittered = boxes[None] + rng.normal(0.0, 0.12, size=(copies, len(anns), 4)) * scale[None]
    jittered[..., 2:] = np.maximum(jittered[..., 2:], 1.0)
    categories = np.tile([a["category_id"] for a in anns], (copies, 1))
    wrong = rng.random(categories.shape) < 0.1
    categories[wrong] = rng.choice(category_ids, size=int(wrong.sum()))
    results = [
        {"image_id": anns[i]["image_id"], "category_id": int(c), "bbox": b.tolist(), "score": s}
        for copy_boxes, copy_categories in zip(jittered, categories, strict=True)
        for i, (b, c, s) in enumerate(
            zip(copy_boxes, copy_categories, rng.random(len(anns)).tolist(), strict=True)
        )
    ]
    for _ in range(200):
        x, y = rng.uniform(0, 400, size=2)
        w, h = rng.uniform(5, 200, size=2)
        results.append(
            {
                "image_id": int(rng.choice(image_ids)),
                "category_id": int(rng.choice(category_ids)),
                "bbox": [x, y, w, h],
                "score": float(rng.random()),
            }
        )
    return results


def assert_same_metrics(a: CocoMetrics, b: CocoMetrics, tolerance: float = TOLERANCE) -> None:
    for name in SUMMARY_NAMES:
        assert getattr(a, name) == pytest.approx(getattr(b, name), abs=tolerance, nan_ok=True)
    assert [c.category_id for c in a.per_category] == [c.category_id for c in b.per_category]
    for ca, cb in zip(a.per_category, b.per_category, strict=True):
        assert (ca.name, ca.num_gt) == (cb.name, cb.num_gt)
        assert ca.AP == pytest.approx(cb.AP, abs=tolerance, nan_ok=True)
        assert ca.AP50 == pytest.approx(cb.AP50, abs=tolerance, nan_ok=True)


def test_pycocotools_reproduces_expected_fake_stats(fake_files, cocoapi_fake_dir):
    gt_path, results_path = fake_files
    with open(cocoapi_fake_dir / "expected_stats_pycocotools_2.0.11.json") as f:
        expected = json.load(f)["bbox"]
    metrics = evaluate_coco(gt_path, results_path, backend="pycocotools")
    got = [getattr(metrics, name) for name in SUMMARY_NAMES]
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
    assert metrics.num_images == 100
    assert metrics.num_detections == 734
    assert metrics.summary.splitlines()[0] == (
        " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.505"
    )
    assert len(metrics.summary.splitlines()) == 12


def test_faster_coco_eval_matches_pycocotools_on_fake_results(fake_files):
    gt_path, results_path = fake_files
    reference = evaluate_coco(gt_path, results_path, backend="pycocotools")
    fast = evaluate_coco(gt_path, results_path, backend="faster_coco_eval")
    assert fast.backend == "faster_coco_eval"
    assert_same_metrics(fast, reference)
    # faster-coco-eval prints AR@0.50 and AR@0.75 after the standard twelve lines.
    assert fast.summary.splitlines()[:12] == reference.summary.splitlines()


def test_faster_coco_eval_matches_pycocotools_on_perturbed_results(tiny_gt_path, tiny_gt):
    results = perturbed_results(tiny_gt, seed=0)
    reference = evaluate_coco(tiny_gt_path, results, backend="pycocotools")
    fast = evaluate_coco(tiny_gt_path, results, backend="faster_coco_eval")
    # A meaningful comparison needs numbers away from 0 and 1.
    assert 0.1 < reference.AP < 0.9 and 0.1 < reference.AR100 < 0.95
    assert_same_metrics(fast, reference)


def test_results_path_and_list_and_coco_object_agree(fake_files):
    gt_path, results_path = fake_files
    with open(results_path) as f:
        results = json.load(f)
    untouched = copy.deepcopy(results)
    with contextlib.redirect_stdout(io.StringIO()):
        gt_object = COCO(str(gt_path))
    from_paths = evaluate_coco(gt_path, results_path)
    from_list = evaluate_coco(gt_object, results)
    assert_same_metrics(from_list, from_paths, tolerance=0.0)
    # pycocotools' loadRes writes keys into the dicts it gets; the caller's list must not change.
    assert results == untouched


def test_perfect_detections_from_gt_boxes_round_trip_to_ap_one(tiny_gt_path, tiny_gt):
    # Contiguous labels index a shuffled category list, so a wrong mapping would score 0.
    category_ids = [c["id"] for c in tiny_gt["categories"]]
    np.random.default_rng(1).shuffle(category_ids)
    label_of = {category_id: k for k, category_id in enumerate(category_ids)}
    image_ids = [image["id"] for image in tiny_gt["images"]]
    detections = []
    for image_id in image_ids:
        anns = [a for a in tiny_gt["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        detections.append(
            {
                "boxes": torch.from_numpy(
                    np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
                ),
                "scores": torch.ones(len(anns)),
                "labels": torch.tensor(
                    [label_of[a["category_id"]] for a in anns], dtype=torch.int64
                ),
            }
        )
    results = detections_to_coco_results(image_ids, detections, category_ids)
    metrics = evaluate_coco(tiny_gt_path, results)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"):
        assert getattr(metrics, name) == 1.0, name
    assert metrics.AR1 < 1.0  # images with several boxes of a class need more than one detection


def test_detections_to_coco_results_converts_boxes_and_labels():
    boxes = np.array([[10.5, 20.25, 30.5, 60.0], [0.0, 0.0, 1.0, 2.0]], dtype=np.float32)
    detections = [
        {
            "boxes": torch.from_numpy(boxes),
            "scores": torch.tensor([0.9, 0.25]),
            "labels": torch.tensor([2, 0]),
        },
        {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)},
        {
            "boxes": torch.tensor([[1.0, 2.0, 3.0, 5.0]], dtype=torch.bfloat16),
            "scores": torch.tensor([0.5], dtype=torch.bfloat16),
            "labels": np.array([1]),
        },
    ]
    results = detections_to_coco_results([7, 8, 9], detections, category_ids=[1, 5, 90])
    assert results == [
        {
            "image_id": 7,
            "category_id": 90,
            "bbox": [10.5, 20.25, 20.0, 39.75],
            "score": 0.8999999761581421,
        },
        {"image_id": 7, "category_id": 1, "bbox": [0.0, 0.0, 1.0, 2.0], "score": 0.25},
        {"image_id": 9, "category_id": 5, "bbox": [1.0, 2.0, 2.0, 3.0], "score": 0.5},
    ]
    json.dumps(results)  # plain Python numbers only


def test_detections_to_coco_results_xywh_round_trip_is_exact_for_float32():
    rng = np.random.default_rng(0)
    top_left = rng.uniform(0, 1000, size=(500, 2)).astype(np.float32)
    boxes = np.concatenate([top_left, top_left + rng.uniform(0, 500, (500, 2))], 1).astype(
        np.float32
    )
    detection = {
        "boxes": torch.from_numpy(boxes),
        "scores": torch.rand(500),
        "labels": torch.zeros(500, dtype=torch.int64),
    }
    xywh = np.array([r["bbox"] for r in detections_to_coco_results([1], [detection], [3])])
    np.testing.assert_array_equal(xywh[:, :2] + xywh[:, 2:], boxes[:, 2:])
    np.testing.assert_array_equal(xywh[:, :2], boxes[:, :2])


def _one_box(**overrides):
    detection = {"boxes": np.zeros((1, 4)), "scores": np.ones(1), "labels": np.array([0])}
    return {**detection, **overrides}


NO_BOXES = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}


@pytest.mark.parametrize(
    ("image_ids", "detections", "message"),
    [
        ([4], [{"boxes": np.zeros((1, 4)), "scores": np.ones(1)}], "image 4 lack the key"),
        ([4], [_one_box(labels=np.array([3]))], "image 4: labels span"),
        ([4], [_one_box(labels=np.array([0.0]))], "image 4: labels must be integers"),
        ([4], [_one_box(boxes=np.zeros((2, 4)))], r"image 4: expected boxes \(N, 4\)"),
        ([4], [_one_box(boxes=np.array([[5.0, 0, 1, 1]]))], "image 4 .* x2 < x1"),
        ([4], [_one_box(scores=np.array([np.nan]))], "image 4 contain non-finite"),
        ([4, 4], [NO_BOXES, NO_BOXES], "image id 4 appears more than once"),
        ([4, 5], [NO_BOXES], "2 image ids but 1 detection"),
    ],
)
def test_detections_to_coco_results_rejects_bad_input(image_ids, detections, message):
    with pytest.raises(ValueError, match=message):
        detections_to_coco_results(image_ids, detections, category_ids=[1, 2, 3])


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_empty_results_score_zero(tiny_gt_path, tiny_gt, backend):
    metrics = evaluate_coco(tiny_gt_path, [], backend=backend)
    assert metrics.summary_numbers() == dict.fromkeys(SUMMARY_NAMES, 0.0)
    assert metrics.num_detections == 0
    with_gt = {a["category_id"] for a in tiny_gt["annotations"] if not a["iscrowd"]}
    for category in metrics.per_category:
        if category.category_id in with_gt:
            assert category.AP == 0.0 and category.num_gt > 0
        else:
            assert math.isnan(category.AP) and category.num_gt == 0
    exported = metrics.to_dict()
    assert exported["AP"] == 0.0
    assert any(c["AP"] is None for c in exported["per_category"])


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_image_ids_subset_equals_evaluating_a_gt_of_those_images(tiny_gt, backend):
    results = perturbed_results(tiny_gt, seed=1)
    subset = sorted(image["id"] for image in tiny_gt["images"])[::3]
    subset_gt = {
        **tiny_gt,
        "images": [image for image in tiny_gt["images"] if image["id"] in subset],
        "annotations": [a for a in tiny_gt["annotations"] if a["image_id"] in subset],
    }
    subset_results = [r for r in results if r["image_id"] in subset]
    expected = evaluate_coco(_coco(subset_gt), subset_results, backend="pycocotools")
    got = evaluate_coco(_coco(tiny_gt), results, backend=backend, image_ids=subset)
    assert_same_metrics(got, expected)
    assert got.num_images == len(subset)
    assert got.num_detections == len(subset_results) < len(results)
    everything = evaluate_coco(_coco(tiny_gt), results, backend=backend)
    assert got.AP != everything.AP


def test_per_category_ap_matches_pycocotools_run_on_that_category(fake_files):
    gt_path, results_path = fake_files
    metrics = evaluate_coco(gt_path, results_path)
    by_id = {c.category_id: c for c in metrics.per_category}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        detections = gt.loadRes(str(results_path))
        for category_id in (1, 3, 18):
            coco_eval = COCOeval(gt, detections, "bbox")
            coco_eval.params.catIds = [category_id]
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
            assert by_id[category_id].AP == pytest.approx(coco_eval.stats[0], abs=TOLERANCE)
            assert by_id[category_id].AP50 == pytest.approx(coco_eval.stats[1], abs=TOLERANCE)
    assert by_id[1].name == "person"
    assert by_id[1].num_gt == sum(
        1 for a in gt.dataset["annotations"] if a["category_id"] == 1 and not a["iscrowd"]
    )
    # COCO's AP is the mean over categories that have GT.
    assert np.nanmean([c.AP for c in metrics.per_category]) == pytest.approx(metrics.AP, abs=1e-12)
    assert metrics.ap_by_category_name()["person"] == by_id[1].AP
    assert metrics.ap_by_category_id()[1] == by_id[1].AP


def test_category_table_is_aligned(fake_files):
    metrics = evaluate_coco(*fake_files)
    table = format_category_table(metrics)
    lines = table.splitlines()
    assert lines[0].split() == ["category", "id", "AP", "AP50", "#GT"]
    assert len({len(line) for line in lines}) == 1
    assert len(lines) == 2 + len(metrics.per_category)
    person = next(line for line in lines if line.startswith("person "))
    c = metrics.per_category[0]
    assert person.split() == ["person", "1", f"{c.AP:.3f}", f"{c.AP50:.3f}", str(c.num_gt)]
    no_gt = next(c for c in metrics.per_category if c.num_gt == 0)
    row = next(line for line in lines if line.split()[-4] == str(no_gt.category_id))
    assert row.split()[-3:] == ["-", "-", "0"]


def test_write_evaluation_writes_both_files(tmp_path, fake_files):
    _, results_path = fake_files
    with open(results_path) as f:
        results = json.load(f)
    metrics = evaluate_coco(fake_files[0], results)
    write_evaluation(tmp_path / "eval", results, metrics)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == sorted(
        [RESULTS_FILENAME, METRICS_FILENAME]
    )
    with open(tmp_path / "eval" / RESULTS_FILENAME) as f:
        assert json.load(f) == results
    with open(tmp_path / "eval" / METRICS_FILENAME) as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(metrics.to_dict()))
    assert written["AP"] == metrics.AP
    assert None in [c["AP"] for c in written["per_category"]]  # NaN is written as null


def test_rejects_unknown_ids_and_malformed_results(tiny_gt_path, tiny_gt, tmp_path):
    good = {
        "image_id": tiny_gt["images"][0]["id"],
        "category_id": 1,
        "bbox": [0, 0, 5, 5],
        "score": 0.5,
    }
    with pytest.raises(ValueError, match="image ids absent .*: 123456789"):
        evaluate_coco(tiny_gt_path, [good, {**good, "image_id": 123456789}])
    with pytest.raises(ValueError, match="category ids absent .*: 12$"):
        evaluate_coco(tiny_gt_path, [good, {**good, "category_id": 12}])
    with pytest.raises(ValueError, match="image_ids has ids absent .*: 5"):
        evaluate_coco(tiny_gt_path, [good], image_ids=[5])
    with pytest.raises(ValueError, match="result 1 lacks the key"):
        evaluate_coco(tiny_gt_path, [good, {k: v for k, v in good.items() if k != "score"}])
    with pytest.raises(ValueError, match=r"result 1 \(image .*\) has bbox"):
        evaluate_coco(tiny_gt_path, [good, {**good, "bbox": [0, 0, 5]}])
    with pytest.raises(ValueError, match="result 0 .* negative bbox"):
        evaluate_coco(tiny_gt_path, [{**good, "bbox": [0, 0, -5, 5]}])
    with pytest.raises(ValueError, match="unknown evaluation backend"):
        evaluate_coco(tiny_gt_path, [good], backend="detectron2")

    not_a_list = tmp_path / "results.json"
    not_a_list.write_text('{"image_id": 1}')
    with pytest.raises(ValueError, match=f"{not_a_list}.* must hold a list"):
        evaluate_coco(tiny_gt_path, not_a_list)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_coco(tmp_path / "missing.json", [])
    truncated = tmp_path / "gt.json"
    truncated.write_text('{"images": [')
    with pytest.raises(ValueError, match=f"{truncated} is not valid JSON"):
        evaluate_coco(truncated, [])


def test_missing_faster_coco_eval_names_package_and_extra(tiny_gt_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"faster-coco-eval.*retinanet\[fast-eval\]"):
        evaluate_coco(tiny_gt_path, [], backend="faster_coco_eval")


def _coco(dataset: dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(dataset)
        coco.createIndex()
    return coco
