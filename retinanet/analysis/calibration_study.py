"""The calibration study of trained models: how well do detection scores match precision, before
and after NMS, and how much do temperature scaling and isotonic regression help?

For each checkpoint the model is run on data.val, keeping both the final detections (after NMS)
and the pre-NMS candidates (`DetectionPostprocessor.candidates`, only the valid ones, i.e. above
the model's score threshold). Both are matched per image to the ground truth of the original
annotations (`dataset.coco`, original pixels, crowd boxes as ignore regions) with
`match_detections_to_gt`; detections that only hit a crowd region are left out of every
calibration number. Before NMS, the duplicates of a matched box are false positives, as they
would be if NMS let them through: that is what NMS does to calibration.

The images are split once (`split_image_ids`, the same split for every model on the same data)
into a fit part and an evaluation part. All numbers are computed on the evaluation part. The
detections scored are those whose *original* score is >= min_score, the detector's operating
point: recalibration changes their confidences, never which detections are scored. So that all
rows are binned alike, every reliability diagram uses `num_bins` equal bins over [0, 1].
Temperature scaling and isotonic regression are fitted on the after-NMS detections of the fit
part with original score >= min_score, then applied to the evaluation part. When one cannot
be fitted (say, no correct detection in the fit part), its numbers are null and the reason is
recorded.

COCO AP and AP50 on the evaluation part are reported with the original scores and with each
recalibrated set. Temperature scaling is strictly increasing, so its AP equals the original one
unless float rounding merges scores into ties (see `apply_temperature`); isotonic regression is
only non-decreasing and may change AP.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from pycocotools.coco import COCO

from retinanet.analysis.ablation import setting_of_run
from retinanet.analysis.calibration import (
    CalibrationResult,
    IsotonicCalibrator,
    apply_temperature,
    calibration_metrics,
    fit_isotonic,
    fit_temperature,
    match_detections_to_gt,
    reliability_diagram,
    scores_to_logits,
    split_image_ids,
)
from retinanet.analysis.entropy import EntropyTally, plot_entropy
from retinanet.analysis.loss_study import anchors_in_padding
from retinanet.analysis.tables import (
    fixed,
    format_value,
    markdown_table,
    mean_and_std,
    mean_std_cell,
    percent,
    write_table,
)
from retinanet.data import CocoDetection
from retinanet.data.build import build_dataset, build_test_loader, resolve_data_paths
from retinanet.data.classes import ClassInfo
from retinanet.engine.checkpoint import (
    FINAL_CHECKPOINT,
    checkpoint_config,
    load_checkpoint,
    load_trained_model,
)
from retinanet.engine.coco_metrics import detections_to_coco_results, evaluate_coco
from retinanet.engine.inference import (
    detections_to_numpy,
    iter_model_outputs,
    keep_known_categories,
)
from retinanet.engine.precision import AmpMode
from retinanet.files import atomic_write_json, json_safe
from retinanet.model.postprocess import scale_to_original
from retinanet.model.retinanet import RetinaNet

# The score sets of the study, in table order: name -> label in tables and diagram titles.
SCORE_SETS = {
    "before_nms": "before NMS",
    "after_nms": "after NMS",
    "temperature": "after NMS + temperature",
    "isotonic": "after NMS + isotonic",
}
CALIBRATION_FILENAME = "calibration.json"
# The loss settings a record keeps from the checkpoint's config.
LOSS_KEYS = (
    "modulation",
    "gamma",
    "alpha",
    "label_smoothing",
    "gamma_schedule",
    "gamma_start",
    "alpha_start",
)
# The score sets that AP is reported for, and the suffix of their AP columns.
AP_SUFFIXES = {"after_nms": "", "temperature": "_temperature", "isotonic": "_isotonic"}
TABLE_COLUMNS = (
    "model",
    "checkpoint",
    "modulation",
    "gamma",
    "alpha",
    "label_smoothing",
    *(f"{metric}_{name}" for name in SCORE_SETS for metric in ("d_ece", "mce", "brier")),
    "temperature",
    *(f"{metric}{suffix}" for suffix in AP_SUFFIXES.values() for metric in ("ap", "ap50")),
    "entropy_foreground",
    "entropy_background",
)


@dataclass(frozen=True)
class CalibrationSettings:
    """iou_threshold: a detection is correct at this IoU with an unmatched same-class box;
    num_bins: confidence bins over [0, 1]; min_score: detections scoring at least this are
    studied; fit_fraction / seed: the share of the images the calibrators are fitted on, drawn
    with this seed (the rest evaluate them)."""

    iou_threshold: float = 0.5
    num_bins: int = 10
    min_score: float = 0.3
    fit_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score < 1.0:
            raise ValueError(f"min_score must lie in [0, 1), got {self.min_score}")


@dataclass
class Predictions:
    """Per image, in dataset order: `image_ids`; `detections` after NMS and `candidates`
    before it, each a dict of numpy arrays `boxes` (N, 4) float32 xyxy original-image pixels,
    `scores` (N,) float32 and `labels` (N,) int64 contiguous class indices."""

    image_ids: list[int]
    detections: list[dict[str, np.ndarray]]
    candidates: list[dict[str, np.ndarray]]
    # mean class-score entropy of foreground / background anchors (see analysis/entropy.py)
    entropy: dict[str, Any]


@torch.no_grad()
def collect_predictions(
    model: RetinaNet,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    min_candidate_score: float = 0.0,
    amp: AmpMode | None = None,
    progress: bool = False,
) -> Predictions:
    """Run `model` (eval mode, restored afterwards) over the test-time batches of `loader` once,
    keeping the final detections and the valid pre-NMS candidates scoring >=
    `min_candidate_score`, both scaled to original-image pixels as
    `DetectionPostprocessor.__call__` scales its detections. Candidates below the threshold are
    dropped because there are up to 1000 per level and image; they cannot change how the ones
    above it match (matching is greedy in score order). Also tallies the entropy of the class
    scores of foreground and background anchors.
    """
    predictions = Predictions([], [], [], {})
    entropy = EntropyTally()
    for batch, outputs in iter_model_outputs(model, loader, device, amp, progress):
        _, anchor_classes, _ = model.criterion.match(outputs.anchors, batch.targets)
        padding = anchors_in_padding(outputs.anchors, batch.image_sizes)
        entropy.add(outputs.cls_logits, anchor_classes, padding)
        original_sizes = torch.tensor(batch.orig_sizes, device=device)
        candidates = model.postprocessor.candidates(outputs, batch.image_sizes)
        detections = model.postprocessor.select(*candidates, batch.image_sizes, original_sizes)
        boxes, scores, labels, valid = candidates
        boxes = scale_to_original(boxes, batch.image_sizes, original_sizes)
        kept = valid & (scores >= min_candidate_score)
        for i, image_id in enumerate(batch.image_ids):
            predictions.image_ids.append(int(image_id))
            predictions.detections.append(detections_to_numpy(detections[i]))
            mask = kept[i]
            candidate = dict(boxes=boxes[i, mask], scores=scores[i, mask], labels=labels[i, mask])
            predictions.candidates.append(detections_to_numpy(candidate))
    predictions.entropy = entropy.means()
    return predictions


def ground_truth(coco: COCO, image_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GT of one image from COCO annotations: boxes (M, 4) float64 xyxy original pixels,
    category ids (M,) int64, iscrowd (M,) bool."""
    if image_id not in coco.imgs:
        raise ValueError(f"image id {image_id} is not in the COCO annotations")
    annotations = coco.imgToAnns.get(image_id, [])
    xywh = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    categories = np.array([a["category_id"] for a in annotations], dtype=np.int64)
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool)
    return boxes, categories, crowd


def model_name(weights: str | os.PathLike) -> str:
    """A checkpoint's name in tables: its folder's name for the trainer's final checkpoint
    (runs/gamma2/model_final.pth -> gamma2), else its file name without suffix."""
    path = Path(weights)
    if path.name == FINAL_CHECKPOINT:
        return path.resolve().parent.name
    return path.stem


def calibrate_model(
    weights: str | os.PathLike,
    output_dir: str | os.PathLike,
    config_path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    settings: CalibrationSettings = CalibrationSettings(),
    device: torch.device | str = "cpu",
    name: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The study of one checkpoint (see module doc); writes `output_dir`/calibration.json and one
    reliability diagram per score set (reliability_<set>.png) and returns the JSON record.

    The model is built from `config_path` plus `overrides` (default: the checkpoint's config);
    the loss settings in the record (`LOSS_KEYS`) are those of the config stored in the
    checkpoint, i.e. the ones it was trained with.
    """
    device = torch.device(device)
    min_score = settings.min_score
    name = name or model_name(weights)
    trained_loss = checkpoint_config(load_checkpoint(weights)).loss
    model, cfg, classes = load_trained_model(weights, config_path, list(overrides), device)
    cfg = resolve_data_paths(cfg)
    dataset = build_dataset(cfg, "val", training=False)
    try:
        fit_ids, eval_ids = split_image_ids(dataset.image_ids, settings.fit_fraction, settings.seed)
    except ValueError as error:
        raise ValueError(f"{dataset.annotation_file}: {error}") from error

    loader = build_test_loader(cfg, dataset)
    predictions = collect_predictions(model, loader, device, min_score, cfg.precision.amp, progress)
    after_nms, before_nms = (
        _ScoredDetections(
            dataset.coco, predictions.image_ids, sets, classes, settings.iou_threshold
        )
        for sets in (predictions.detections, predictions.candidates)
    )
    temperature, isotonic, rescored, num_fit = _fit_calibrators(after_nms, fit_ids, min_score)
    num_bins = settings.num_bins
    results = {"before_nms": before_nms.calibration(eval_ids, min_score, num_bins)} | {
        key: None if s is None else after_nms.calibration(eval_ids, min_score, num_bins, s)
        for key, s in rescored.items()
    }
    output_dir = Path(output_dir)
    _write_reliability_diagrams(
        results,
        output_dir,
        f"{name}, {len(eval_ids)} evaluation images, original score >= {min_score:g}",
    )
    coco_ap = {
        key: _average_precision(
            dataset, after_nms, rescores, eval_ids, cfg.eval.backend, str(weights)
        )
        for key, rescores in rescored.items()
    }

    record = {
        "model": name,
        "checkpoint": str(weights),
        "loss": {k: getattr(trained_loss, k) for k in LOSS_KEYS},
        "annotation_file": str(dataset.annotation_file),
        "settings": dataclasses.asdict(settings),
        "fit_image_ids": fit_ids,
        "eval_image_ids": eval_ids,
        "num_fit_detections": num_fit,
        "temperature": {"T": temperature.value, "error": temperature.error},
        "isotonic": {"error": isotonic.error, **_knots(isotonic.value)},
        "calibration": {
            key: None if result is None else _result_record(result)
            for key, result in results.items()
        },
        "coco": coco_ap,
        "entropy": predictions.entropy,
    }
    record = json_safe(record)
    atomic_write_json(output_dir / CALIBRATION_FILENAME, record)
    return record


class _Fit(NamedTuple):
    """A fitted calibrator, or None and why it could not be fitted."""

    value: Any
    error: str | None


def _fit(fit: Callable[[], Any]) -> _Fit:
    """The calibrator `fit` returns, or None and the reason when the fit part admits no fit."""
    try:
        return _Fit(fit(), None)
    except ValueError as error:
        return _Fit(None, str(error))


def _fit_calibrators(
    after_nms: _ScoredDetections, fit_ids: Sequence[int], min_score: float
) -> tuple[_Fit, _Fit, dict[str, np.ndarray | None], int]:
    """Temperature scaling and isotonic regression fitted on the after-NMS detections of the fit
    images scoring >= `min_score`; all after-NMS scores (every image, for AP) as they are and
    rescored by each calibrator (None where it could not be fitted); the number of fit
    detections."""
    rows = after_nms.rows(fit_ids, min_score)
    fit_scores, fit_correct = after_nms.scores[rows], after_nms.correct[rows]
    temperature = _fit(lambda: fit_temperature(scores_to_logits(fit_scores), fit_correct))
    isotonic = _fit(lambda: fit_isotonic(fit_scores, fit_correct))
    scores = after_nms.scores
    rescored = {
        "after_nms": scores,
        "temperature": None
        if temperature.value is None
        else apply_temperature(scores, temperature.value),
        "isotonic": None if isotonic.value is None else isotonic.value.apply(scores),
    }
    return temperature, isotonic, rescored, int(len(fit_scores))


def _knots(curve: IsotonicCalibrator | None) -> dict[str, list[float] | None]:
    return {
        "knot_scores": None if curve is None else curve.knot_scores.tolist(),
        "knot_values": None if curve is None else curve.knot_values.tolist(),
    }


def compare_calibration(
    weights: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    config_path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    settings: CalibrationSettings = CalibrationSettings(),
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """`calibrate_model` for each checkpoint into `output_dir`/<model name>/, then the table
    `output_dir`/calibration.csv and .md with one row per checkpoint. Returns the records."""
    if not weights:
        raise ValueError("no checkpoints given")
    missing = [str(w) for w in weights if not Path(w).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint not found: {', '.join(missing)}")
    names: dict[str, str] = {}
    for path in weights:
        name = model_name(path)
        if name in names:
            raise ValueError(
                f"checkpoints {names[name]} and {path} would both be named {name!r}; "
                "rename one (the name is the file name, or the folder of a model_final.pth)"
            )
        names[name] = str(path)

    output_dir = Path(output_dir)
    records = [
        calibrate_model(
            path,
            output_dir / name,
            config_path=config_path,
            overrides=overrides,
            settings=settings,
            device=device,
            name=name,
            progress=progress,
        )
        for name, path in names.items()
    ]
    write_calibration_table(records, output_dir)
    write_seed_summary(records, output_dir)
    plot_entropy(records, output_dir / "entropy.png")
    return records


def write_calibration_table(
    records: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike
) -> dict[str, Path]:
    """calibration.csv (columns `TABLE_COLUMNS`, fractions, empty where undefined) and
    calibration.md (D-ECE / MCE / Brier per score set, AP in percent) in `output_dir`."""
    if not records:
        raise ValueError("no calibration records to tabulate")
    rows = [_table_row(record) for record in records]

    def triple(row: Mapping[str, Any], key: str) -> str:
        return " / ".join(fixed(row[f"{metric}_{key}"], 3) for metric in ("d_ece", "mce", "brier"))

    header = [
        "model",
        "loss",
        "α",
        *SCORE_SETS.values(),
        "T",
        "AP",
        "AP (temperature)",
        "AP (isotonic)",
        "entropy fg / bg",
    ]
    cells = [
        [
            row["model"],
            loss_label(row),
            format_value(row["alpha"]),
            *(triple(row, key) for key in SCORE_SETS),
            fixed(row["temperature"], 3),
            *(
                f"{percent(row[f'ap{suffix}'])} / {percent(row[f'ap50{suffix}'])}"
                for suffix in AP_SUFFIXES.values()
            ),
            f"{fixed(row['entropy_foreground'], 3)} / {fixed(row['entropy_background'], 4)}",
        ]
        for row in rows
    ]
    settings = records[0]["settings"]
    lines = [
        f"D-ECE / MCE / Brier of the detections with original score >= {settings['min_score']} "
        f"on the evaluation images, correct at IoU >= {settings['iou_threshold']}; "
        "AP / AP50 in percent on the same images; entropy: mean entropy (nats) of the class "
        "scores of foreground / background anchors on all images.",
        "",
        *markdown_table(header, cells),
    ]
    csv_rows = [[row[c] for c in TABLE_COLUMNS] for row in rows]
    return write_table(output_dir, "calibration", TABLE_COLUMNS, csv_rows, lines)


def loss_label(row: Mapping[str, Any]) -> str:
    """The training loss of a table row in words: "CE", "CE + LS 0.1", "FL γ 2", "FL γ 0→2
    (linear, α 0.75→)", "FLSD-53", or the modulation's name for the other factors."""
    smoothing = row.get("label_smoothing") or 0
    if row["modulation"] == "flsd":
        return "FLSD-53"
    if row["modulation"] != "power":
        return str(row["modulation"])
    if row.get("gamma_schedule"):
        ramp = row["gamma_schedule"]
        if row.get("alpha_start") is not None:
            ramp += f", α {row['alpha_start']:g}→"
        return f"FL γ {row['gamma_start']:g}→{row['gamma']:g} ({ramp})"
    if row["gamma"] == 0:
        return "CE" + (f" + LS {smoothing:g}" if smoothing else "")
    return f"FL γ {row['gamma']:g}"


# Columns of the per-setting summary over seeds: (header, row key, cell format).
SUMMARY_COLUMNS: tuple[tuple[str, str, Callable[[float | None], str]], ...] = (
    *(
        (f"D-ECE {title}", f"d_ece_{key}", lambda v: fixed(v, 3))
        for key, title in SCORE_SETS.items()
    ),
    ("T", "temperature", lambda v: fixed(v, 2)),
    ("AP", "ap", percent),
    ("AP (temperature)", "ap_temperature", percent),
    ("entropy fg", "entropy_foreground", lambda v: fixed(v, 3)),
    ("entropy bg", "entropy_background", lambda v: fixed(v, 3)),
)


def write_seed_summary(
    records: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike
) -> dict[str, Path] | None:
    """calibration_by_setting.csv / .md in `output_dir`: the records grouped by setting (the
    model name without ablate's _seed<k> suffix), each `SUMMARY_COLUMNS` value as mean and
    standard deviation over the group's seeds. None (nothing written) when no setting has
    several seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(setting_of_run(record["model"]), []).append(_table_row(record))
    if all(len(rows) < 2 for rows in groups.values()):
        for suffix in (".csv", ".md"):  # not left over from an earlier run with seeds
            (Path(output_dir) / f"calibration_by_setting{suffix}").unlink(missing_ok=True)
        return None
    for setting, rows in groups.items():
        losses = {(loss_label(row), row["alpha"]) for row in rows}
        if len(losses) > 1:
            raise ValueError(
                f"the runs of setting {setting!r} were trained with different losses "
                f"{sorted(map(str, losses))}; give them different names"
            )
    columns = ["setting", "loss", "alpha", "seeds"]
    columns += [f"{key}{part}" for _, key, _ in SUMMARY_COLUMNS for part in ("", "_std")]
    header = ["setting", "loss", "α", "seeds", *(title for title, _, _ in SUMMARY_COLUMNS)]
    csv_rows, cells = [], []
    for setting, rows in groups.items():
        stats = [mean_and_std([row[key] for row in rows]) for _, key, _ in SUMMARY_COLUMNS]
        label, alpha = loss_label(rows[0]), rows[0]["alpha"]
        csv_rows.append([setting, label, alpha, len(rows), *(v for pair in stats for v in pair)])
        cells.append(
            [setting, label, format_value(alpha), str(len(rows))]
            + [
                mean_std_cell(*pair, cell)
                for pair, (_, _, cell) in zip(stats, SUMMARY_COLUMNS, strict=True)
            ]
        )
    lines = [
        "Calibration by setting: mean ± standard deviation over seeds (the rows of "
        "calibration.md grouped by setting; AP in percent).",
        "",
        *markdown_table(header, cells),
    ]
    return write_table(output_dir, "calibration_by_setting", columns, csv_rows, lines)


class _ScoredDetections:
    """All detections of a run flattened: per detection its image, score and match to the GT
    of `coco` (`match_detections_to_gt`; contiguous labels mapped to dataset categories by
    `classes`); built per image, queried by image ids."""

    def __init__(
        self,
        coco: COCO,
        image_ids: list[int],
        detections: Sequence[Mapping[str, np.ndarray]],
        classes: ClassInfo,
        iou_threshold: float,
    ) -> None:
        lookup = np.asarray(classes.category_ids, dtype=np.int64)
        matches = [
            match_detections_to_gt(
                det["boxes"],
                det["scores"],
                lookup[det["labels"]],
                *ground_truth(coco, image_id),
                iou_threshold,
            )
            for image_id, det in zip(image_ids, detections, strict=True)
        ]
        counts = [len(d["scores"]) for d in detections]
        self.image_ids = image_ids
        self.detections = detections
        self.category_ids = classes.category_ids
        self.image_of = np.repeat(np.asarray(image_ids, dtype=np.int64), counts)
        self.scores = _concat([d["scores"] for d in detections], np.float64)
        self.correct = _concat([m.correct for m in matches], bool)
        self.ignored = _concat([m.ignored for m in matches], bool)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def rows(self, image_ids: Sequence[int], min_score: float) -> np.ndarray:
        """Indices of the detections of `image_ids` scoring >= min_score, crowd-only ones out."""
        return np.flatnonzero(
            np.isin(self.image_of, image_ids) & (self.scores >= min_score) & ~self.ignored
        )

    def calibration(
        self,
        image_ids: Sequence[int],
        min_score: float,
        num_bins: int,
        scores: np.ndarray | None = None,
    ) -> CalibrationResult:
        """Calibration, binned over [0, 1], of the detections `rows` selects, with `scores`
        (aligned with `self.scores`) in place of their own when given."""
        rows = self.rows(image_ids, min_score)
        scores = self.scores if scores is None else scores
        return calibration_metrics(scores[rows], self.correct[rows], num_bins, 0.0)

    def coco_results(self, scores: np.ndarray) -> list[dict[str, Any]]:
        """COCO results of all detections with `scores` (aligned with `self.scores`)."""
        rescored = [
            {**det, "scores": scores[self.offsets[i] : self.offsets[i + 1]]}
            for i, det in enumerate(self.detections)
        ]
        return detections_to_coco_results(self.image_ids, rescored, self.category_ids)


def _write_reliability_diagrams(
    results: Mapping[str, CalibrationResult | None], output_dir: Path, subtitle: str
) -> None:
    """reliability_<set>.png per score set; a set without result (its calibrator could not be
    fitted) has its diagram of an earlier run removed, so that none is stale."""
    for key, result in results.items():
        path = output_dir / f"reliability_{key}.png"
        if result is None:
            path.unlink(missing_ok=True)
        else:
            reliability_diagram(result, path, f"{SCORE_SETS[key]}\n({subtitle})")


def _average_precision(
    dataset: CocoDetection,
    detections: _ScoredDetections,
    scores: np.ndarray | None,
    image_ids: Sequence[int],
    backend: str,
    source: str,
) -> dict[str, float]:
    """COCO AP and AP50 over `image_ids` of `detections` rescored with `scores`; NaN without
    scores."""
    if scores is None:
        return {"AP": math.nan, "AP50": math.nan}
    results = keep_known_categories(detections.coco_results(scores), dataset, source)
    metrics = evaluate_coco(dataset.coco, results, backend=backend, image_ids=image_ids)
    return {"AP": metrics.AP, "AP50": metrics.AP50}


def _result_record(result: CalibrationResult) -> dict[str, Any]:
    record = {key: getattr(result, key) for key in ("d_ece", "mce", "brier", "num_detections")}
    arrays = ("bin_edges", "counts", "mean_confidence", "precision")
    return record | {key: getattr(result, key).tolist() for key in arrays}


def _table_row(record: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": record["model"], "checkpoint": record["checkpoint"]}
    # label_smoothing is missing from records written before it existed
    row.update({key: record["loss"].get(key) for key in LOSS_KEYS})
    for key in SCORE_SETS:
        result = record["calibration"][key] or {}
        for metric in ("d_ece", "mce", "brier"):
            row[f"{metric}_{key}"] = result.get(metric)
    row["temperature"] = record["temperature"]["T"]
    for key, suffix in AP_SUFFIXES.items():
        row[f"ap{suffix}"] = record["coco"][key]["AP"]
        row[f"ap50{suffix}"] = record["coco"][key]["AP50"]
    entropy = record.get("entropy") or {}
    row["entropy_foreground"] = entropy.get("foreground")
    row["entropy_background"] = entropy.get("background")
    return row


def _concat(arrays: Sequence[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=dtype) for a in arrays] or [np.zeros(0, dtype)])
