"""COCO bounding-box evaluation: detections to the COCO results format, the 12 standard numbers
and per-category AP from pycocotools (the reference) or faster-coco-eval, and the files written
after an evaluation.

Detections, per image, are a mapping with
    boxes:  (N, 4) float, xyxy in original-image pixels
    scores: (N,) float in [0, 1]
    labels: (N,) int64 contiguous class indices in [0, K)
as torch tensors or numpy arrays; `category_ids[k]` is the dataset category id of index k.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from retinanet.data.coco import check_coco_dict, complete_for_evaluation
from retinanet.files import atomic_write_json, json_safe

# pycocotools is the reference; faster_coco_eval gives the same numbers faster.
EvalBackend = Literal["pycocotools", "faster_coco_eval"]
BACKENDS: tuple[str, ...] = get_args(EvalBackend)

RESULTS_FILENAME = "coco_results.json"
METRICS_FILENAME = "metrics.json"


@dataclass(frozen=True)
class CategoryAP:
    """AP of one category over the evaluated images; `AP` and `AP50` are NaN when the category
    has no non-crowd GT box there (COCO leaves it out of the mean). `num_gt` counts non-crowd GT
    boxes, the ones recall is measured against."""

    category_id: int
    name: str
    AP: float
    AP50: float
    num_gt: int


@dataclass(frozen=True)
class PrecisionArray:
    """COCOeval's accumulated precision at area "all" and 100 detections per image: values
    (T, R, K) for T IoU thresholds (0.5:0.95), R recall thresholds (0:0.01:1) and K categories;
    the interpolated precision at each recall, 0 above the highest recall reached, -1 for a
    category without ground truth. A category's AP is the mean of its entries."""

    values: np.ndarray
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray
    category_ids: tuple[int, ...]


@dataclass(frozen=True)
class CocoMetrics:
    """The 12 COCO bbox numbers as fractions in [0, 1], in `SUMMARY_NAMES` order. A number is NaN
    where COCOeval reports -1, i.e. no GT box falls in that area range (the printed `summary`
    keeps COCO's -1.000). `summary` is the text COCOeval.summarize() printed; faster-coco-eval
    adds two lines (AR at IoU 0.50 and 0.75) to pycocotools' twelve."""

    # The 12 numbers, in the order of COCOeval.stats for iouType="bbox" (`SUMMARY_NAMES`).
    AP: float
    AP50: float
    AP75: float
    APs: float
    APm: float
    APl: float
    AR1: float
    AR10: float
    AR100: float
    ARs: float
    ARm: float
    ARl: float
    per_category: tuple[CategoryAP, ...]
    summary: str
    backend: str
    num_images: int
    num_detections: int
    # the array the AP numbers average (for precision-recall curves); not in metrics.json
    precision: PrecisionArray | None = field(default=None, repr=False, compare=False)

    def summary_numbers(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in SUMMARY_NAMES}

    def ap_by_category_id(self) -> dict[int, float]:
        return {c.category_id: c.AP for c in self.per_category}

    def ap_by_category_name(self) -> dict[str, float]:
        return {c.name: c.AP for c in self.per_category}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for `metrics.json`; NaN becomes null (JSON has no NaN)."""
        return json_safe(
            {
                "backend": self.backend,
                "num_images": self.num_images,
                "num_detections": self.num_detections,
                **self.summary_numbers(),
                "per_category": [asdict(c) for c in self.per_category],
                "summary": self.summary,
            }
        )


SUMMARY_NAMES = tuple(f.name for f in fields(CocoMetrics)[:12])


def detections_to_coco_results(
    image_ids: Sequence[int],
    detections: Sequence[Mapping[str, Any]],
    category_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """COCO results (`image_id`, `category_id`, `bbox` as [x, y, w, h] float pixels, `score`)
    for `detections[i]` of image `image_ids[i]`; labels are mapped through `category_ids`."""
    if len(image_ids) != len(detections):
        raise ValueError(
            f"got {len(image_ids)} image ids but {len(detections)} detection dicts; "
            "they must be aligned one to one"
        )
    category_lookup = np.asarray(category_ids, dtype=np.int64)
    if category_lookup.ndim != 1 or len(category_lookup) == 0:
        raise ValueError("category_ids must be a non-empty list of dataset category ids")

    seen: set[int] = set()
    per_image = []  # (image ids, category ids, boxes xywh, scores) of each image
    for raw_image_id, detection in zip(image_ids, detections, strict=True):
        image_id = int(raw_image_id)
        if image_id in seen:
            raise ValueError(f"image id {image_id} appears more than once in image_ids")
        seen.add(image_id)
        boxes, scores, labels = _validated_detection(detection, image_id, len(category_lookup))
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        ids = np.full(len(scores), image_id, dtype=np.int64)
        per_image.append((ids, category_lookup[labels], xywh, scores))

    if not per_image:
        return []
    return _coco_result_dicts(*(np.concatenate(column) for column in zip(*per_image, strict=True)))


def evaluate_coco(
    coco_gt: Any,
    results: list[dict[str, Any]] | str | os.PathLike,
    backend: str = "pycocotools",
    image_ids: Sequence[int] | None = None,
) -> CocoMetrics:
    """Run COCO bbox evaluation.

    coco_gt: a pycocotools (or faster-coco-eval) `COCO`, or the path of a COCO annotation file.
    results: COCO results as a list of dicts or the path of a JSON file holding that list.
    backend: "pycocotools" (the reference) or "faster_coco_eval" (faster; equal to pycocotools
        up to float rounding, ~1e-16; needs `pip install 'retinanet[fast-eval]'`).
    image_ids: evaluate only these GT images (a shard, a held-out split); default all of them.
        Results on other images are dropped.

    With no detections at all, every AP and AR whose area range has GT is 0. The ground truth is
    checked by the dataset loader's rules first (`retinanet.data.coco.check_coco_dict`): a
    record COCOeval would trip over raises DatasetError naming it; annotations without 'area'
    or 'iscrowd' are evaluated with the box's w * h and 0 (`complete_for_evaluation`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown evaluation backend {backend!r}; choose one of {BACKENDS}")
    checked_dataset, gt_source = _gt_dataset(coco_gt)
    gt_dataset = complete_for_evaluation(checked_dataset)
    if gt_dataset is not checked_dataset or isinstance(coco_gt, (str, os.PathLike)):
        coco_gt = None  # index the completed dict instead of the object given
    if isinstance(results, (str, os.PathLike)):
        results_source = str(results)
        results = _read_json_list(Path(results), "COCO results")
    else:
        results_source = "results"
    result_image_ids, result_categories, result_boxes, result_scores = _results_to_arrays(
        results, results_source
    )

    gt_image_ids = np.array([image["id"] for image in gt_dataset["images"]], dtype=np.int64)
    gt_category_ids = np.array([c["id"] for c in gt_dataset["categories"]], dtype=np.int64)
    _check_ids_known(result_image_ids, gt_image_ids, f"{results_source} has image ids", gt_source)
    _check_ids_known(
        result_categories, gt_category_ids, f"{results_source} has category ids", gt_source
    )
    if image_ids is None:
        eval_image_ids = np.unique(gt_image_ids)
    else:
        eval_image_ids = np.unique(np.asarray(image_ids, dtype=np.int64))
        if len(eval_image_ids) == 0:
            raise ValueError("image_ids is empty; pass None to evaluate all GT images")
        _check_ids_known(eval_image_ids, gt_image_ids, "image_ids has ids", gt_source)

    keep = np.isin(result_image_ids, eval_image_ids)
    kept_results = _coco_result_dicts(
        result_image_ids[keep], result_categories[keep], result_boxes[keep], result_scores[keep]
    )
    run = _run_pycocotools if backend == "pycocotools" else _run_faster_coco_eval
    coco_eval, summary = run(coco_gt, gt_dataset, kept_results, eval_image_ids.tolist())

    stats = np.asarray(coco_eval.stats[: len(SUMMARY_NAMES)], dtype=np.float64)
    # COCOeval's -1 (no GT in that area range) becomes NaN.
    numbers = {
        n: math.nan if v == -1 else float(v) for n, v in zip(SUMMARY_NAMES, stats, strict=True)
    }
    precision = _precision_array(coco_eval)
    return CocoMetrics(
        **numbers,
        per_category=_per_category_ap(precision, gt_dataset, eval_image_ids),
        summary=summary,
        backend=backend,
        num_images=len(eval_image_ids),
        num_detections=len(kept_results),
        precision=precision,
    )


def format_category_table(metrics: CocoMetrics) -> str:
    """Per-category AP as aligned text: name, id, AP, AP50, #GT; '-' where AP is undefined."""
    header = ("category", "id", "AP", "AP50", "#GT")
    rows = [
        (
            c.name,
            str(c.category_id),
            _format_fraction(c.AP),
            _format_fraction(c.AP50),
            str(c.num_gt),
        )
        for c in metrics.per_category
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        # Names read best left-aligned, numbers right-aligned.
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells)

    separator = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), separator, *(line(row) for row in rows)]) + "\n"


def write_evaluation(
    output_dir: str | os.PathLike, results: list[dict[str, Any]], metrics: CocoMetrics
) -> None:
    """Write `coco_results.json` (the results list, compact) and `metrics.json`
    (`metrics.to_dict()`) into `output_dir`, each atomically."""
    output_dir = Path(output_dir)
    atomic_write_json(output_dir / RESULTS_FILENAME, results, indent=None)
    atomic_write_json(output_dir / METRICS_FILENAME, metrics.to_dict())


def _validated_detection(
    detection: Mapping[str, Any], image_id: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """boxes (N, 4) float64, scores (N,) float64 and labels (N,) int64 of one image, checked."""
    missing = [key for key in ("boxes", "scores", "labels") if key not in detection]
    if missing:
        raise ValueError(f"detections of image {image_id} lack the key(s) {missing}")
    # float64 so that x2 - x1 of float32 coordinates is exact and xywh -> xyxy round-trips.
    boxes = _as_numpy(detection["boxes"], np.float64)
    scores = _as_numpy(detection["scores"], np.float64)
    labels = _as_numpy(detection["labels"], None)
    n = len(scores)
    if boxes.shape != (n, 4) or scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(
            f"detections of image {image_id}: expected boxes (N, 4), scores (N,), labels (N,); "
            f"got {boxes.shape}, {scores.shape}, {labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(
            f"detections of image {image_id}: labels must be integers, not {labels.dtype}"
        )
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"detections of image {image_id}: labels span [{labels.min()}, {labels.max()}] but "
            f"only {num_classes} category ids were given"
        )
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise ValueError(f"detections of image {image_id} contain non-finite boxes or scores")
    if (boxes[:, 2:] < boxes[:, :2]).any():
        raise ValueError(f"detections of image {image_id} contain boxes with x2 < x1 or y2 < y1")
    return boxes, scores, labels.astype(np.int64)


def _as_numpy(value: Any, dtype: type | None) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.double()  # also covers bfloat16, which numpy cannot hold
        value = value.numpy()
    return np.asarray(value, dtype=dtype)


def _coco_result_dicts(
    image_ids: np.ndarray, category_ids: np.ndarray, boxes_xywh: np.ndarray, scores: np.ndarray
) -> list[dict[str, Any]]:
    # .tolist() yields plain Python numbers, which json and both COCO backends take as they are.
    return [
        {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}
        for image_id, category_id, bbox, score in zip(
            image_ids.tolist(),
            category_ids.tolist(),
            boxes_xywh.tolist(),
            scores.tolist(),
            strict=True,
        )
    ]


def _results_to_arrays(
    results: Any, source: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """image_id (R,) int64, category_id (R,) int64, bbox (R, 4) float64 xywh, score (R,)."""
    if not isinstance(results, list):
        raise ValueError(f"{source}: COCO results must be a list of dicts, not {type(results)}")
    if not results:
        no_ids = np.zeros(0, np.int64)
        return no_ids, no_ids, np.zeros((0, 4), np.float64), np.zeros(0, np.float64)
    try:
        image_ids = np.array([r["image_id"] for r in results])
        category_ids = np.array([r["category_id"] for r in results])
        boxes = np.array([r["bbox"] for r in results], dtype=np.float64)
        scores = np.array([r["score"] for r in results], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{source}: {_describe_malformed_result(results)}") from error
    integer_ids = image_ids.dtype.kind in "iu" and category_ids.dtype.kind in "iu"
    if not integer_ids or boxes.shape != (len(results), 4) or scores.shape != (len(results),):
        raise ValueError(f"{source}: {_describe_malformed_result(results)}")
    bad = ~(np.isfinite(boxes).all(axis=1) & np.isfinite(scores)) | (boxes[:, 2:] < 0).any(axis=1)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{source}: result {index} (image {results[index]['image_id']}) has a non-finite "
            "score or bbox, or a negative bbox width/height"
        )
    return image_ids.astype(np.int64), category_ids.astype(np.int64), boxes, scores


def _describe_malformed_result(results: list) -> str:
    """Name the first entry that is not {image_id: int, category_id: int, bbox: 4 numbers,
    score: number}; only called once the vectorised parse has failed."""
    for index, result in enumerate(results):
        if not isinstance(result, dict):
            return f"result {index} is a {type(result).__name__}, not a dict"
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in result]
        if missing:
            return f"result {index} lacks the key(s) {missing}"
        for key in ("image_id", "category_id"):
            if not isinstance(result[key], (int, np.integer)) or isinstance(result[key], bool):
                return f"result {index} has a non-integer {key} {result[key]!r}"
        bbox = result["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            return (
                f"result {index} (image {result['image_id']}) has bbox {bbox!r}, not [x, y, w, h]"
            )
        if not all(isinstance(v, (int, float, np.number)) for v in [*bbox, result["score"]]):
            return f"result {index} (image {result['image_id']}) has a non-numeric bbox or score"
    return "results are malformed"


def _check_ids_known(ids: np.ndarray, known: np.ndarray, what: str, gt_source: str) -> None:
    unknown = np.setdiff1d(ids, known)
    if len(unknown):
        shown = ", ".join(str(i) for i in unknown[:5].tolist())
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ValueError(f"{what} absent from the ground truth {gt_source}: {shown}{more}")


def _gt_dataset(coco_gt: Any) -> tuple[dict[str, Any], str]:
    """The annotation dict behind `coco_gt`, checked, and a name for it in error messages."""
    if isinstance(coco_gt, (str, os.PathLike)):
        source = str(coco_gt)
        dataset = _read_json(Path(coco_gt), "COCO annotation")
    elif isinstance(getattr(coco_gt, "dataset", None), dict):
        source = "COCO object"
        dataset = coco_gt.dataset
    else:
        raise TypeError(f"coco_gt must be a COCO object or a path, not {type(coco_gt).__name__}")
    check_coco_dict(dataset, source).raise_on_errors()
    return dataset, source


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} file {path} is not valid JSON: {error}") from error
    except RecursionError as error:
        raise ValueError(f"{what} file {path} is not valid JSON: nested too deeply") from error


def _read_json_list(path: Path, what: str) -> list:
    content = _read_json(path, what)
    if not isinstance(content, list):
        raise ValueError(f"{what} file {path} must hold a list, not {type(content).__name__}")
    return content


def _run_pycocotools(
    coco_gt: Any, gt_dataset: dict[str, Any], results: list[dict[str, Any]], image_ids: list[int]
) -> tuple[Any, str]:
    """COCOeval over `coco_gt` when it is a pycocotools COCO (None: an index of `gt_dataset`)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # pycocotools reports progress with print(); only summarize()'s lines are kept.
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_gt if isinstance(coco_gt, COCO) else _indexed_coco(COCO(), gt_dataset)
        if results:
            detections = gt.loadRes(results)
        else:
            # loadRes indexes results[0]; an empty result set is built by hand instead.
            empty = {
                "images": list(gt_dataset["images"]),
                "categories": copy.deepcopy(gt_dataset["categories"]),
                "annotations": [],
            }
            detections = _indexed_coco(COCO(), empty)
        coco_eval = COCOeval(gt, detections, iouType="bbox")
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()
    return coco_eval, summary.getvalue()


def _run_faster_coco_eval(
    coco_gt: Any, gt_dataset: dict[str, Any], results: list[dict[str, Any]], image_ids: list[int]
) -> tuple[Any, str]:
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError as error:
        raise ImportError(
            "backend='faster_coco_eval' needs the package faster-coco-eval; install it with "
            "pip install 'retinanet[fast-eval]'"
        ) from error

    def quiet(*args: Any, **kwargs: Any) -> None:
        pass

    with contextlib.redirect_stdout(io.StringIO()):
        gt = _indexed_coco(COCO(print_function=quiet), gt_dataset)
        detections = gt.loadRes(results)
        coco_eval = COCOeval_faster(gt, detections, iouType="bbox", print_function=quiet)
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
    lines: list[str] = []
    coco_eval.print_function = lines.append
    coco_eval.summarize()
    return coco_eval, "".join(line + "\n" for line in lines)


def _indexed_coco(coco: Any, dataset: dict[str, Any]) -> Any:
    # Both backends' COCO classes build their look-up tables from .dataset in createIndex().
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _precision_array(coco_eval: Any) -> PrecisionArray:
    params = coco_eval.params
    area_index = list(params.areaRngLbl).index("all")
    max_dets_index = list(params.maxDets).index(100)
    # precision: (T iou thresholds, R recall points, K categories, A areas, M max dets)
    values = np.asarray(coco_eval.eval["precision"])[:, :, :, area_index, max_dets_index]
    return PrecisionArray(
        values=values.astype(np.float64),
        iou_thresholds=np.asarray(params.iouThrs, dtype=np.float64),
        recall_thresholds=np.asarray(params.recThrs, dtype=np.float64),
        category_ids=tuple(int(c) for c in params.catIds),
    )


def _per_category_ap(
    precision: PrecisionArray, gt_dataset: dict[str, Any], eval_image_ids: np.ndarray
) -> tuple[CategoryAP, ...]:
    iou50_index = int(np.flatnonzero(np.isclose(precision.iou_thresholds, 0.5))[0])
    # -1 marks a category without GT, which COCO leaves out of every mean.
    ap = _mean_of_valid(precision.values, axis=(0, 1))
    ap50 = _mean_of_valid(precision.values[iou50_index], axis=0)

    annotations = gt_dataset["annotations"]
    category_of_ann = np.array([a["category_id"] for a in annotations], dtype=np.int64)
    image_of_ann = np.array([a["image_id"] for a in annotations], dtype=np.int64)
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool)
    counted = category_of_ann[~crowd & np.isin(image_of_ann, eval_image_ids)]

    names = {c["id"]: c.get("name", str(c["id"])) for c in gt_dataset["categories"]}
    return tuple(
        CategoryAP(
            category_id=int(category_id),
            name=names[category_id],
            AP=float(ap[k]),
            AP50=float(ap50[k]),
            num_gt=int(np.count_nonzero(counted == category_id)),
        )
        for k, category_id in enumerate(precision.category_ids)
    )


def _mean_of_valid(values: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    valid = values > -1
    count = valid.sum(axis=axis)
    total = np.where(valid, values, 0.0).sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _format_fraction(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"
