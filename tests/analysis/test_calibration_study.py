"""The calibration driver and tools/calibrate.py on a tiny model."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from retinanet.analysis.calibration import (
    calibration_metrics,
    fit_temperature,
    match_detections_to_gt,
    scores_to_logits,
    split_image_ids,
)
from retinanet.analysis.calibration_study import (
    SCORE_SETS,
    TABLE_COLUMNS,
    collect_predictions,
    loss_label,
    model_name,
    write_seed_summary,
)
from retinanet.cli import main as cli
from retinanet.data import create_test_loader
from retinanet.data.build import build_dataset, resolve_data_paths
from retinanet.engine.checkpoint import load_checkpoint, load_trained_model
from retinanet.engine.coco_metrics import detections_to_coco_results, evaluate_coco
from retinanet.engine.inference import run_inference

REPO = Path(__file__).resolve().parents[2]


CPU = torch.device("cpu")
KEEP_ALL = ["model.inference.score_threshold=0", "model.inference.max_detections=1000"]


def test_model_name_is_the_folder_of_a_final_checkpoint():
    assert model_name("runs/gamma2/model_final.pth") == "gamma2"
    assert model_name("runs/gamma2/model_0005000.pth") == "model_0005000"
    assert model_name("weights/r50_coco.pth") == "r50_coco"


def test_candidates_include_the_detections_in_original_pixels(tiny_checkpoint):
    # Test-time resize 64 -> 96 px, so boxes must be scaled back by 2/3.
    overrides = ["input.test_min_size=96", "input.test_max_size=96"]
    model, cfg, _ = load_trained_model(tiny_checkpoint, overrides=overrides)
    dataset = build_dataset(resolve_data_paths(cfg), "val", training=False)
    loader = create_test_loader(dataset, batch_size=4, size_divisibility=32)
    predictions = collect_predictions(model, loader, CPU)

    image_ids, reference = run_inference(model, loader, CPU)
    assert predictions.image_ids == image_ids == dataset.image_ids
    total = 0
    for det, ref, cand in zip(
        predictions.detections, reference, predictions.candidates, strict=True
    ):
        for key in ("boxes", "scores", "labels"):
            assert np.array_equal(det[key], ref[key]), key
        # Every detection is one of the candidates: same label and score, same box.
        same = (
            (det["labels"][:, None] == cand["labels"][None, :])
            & (det["scores"][:, None] == cand["scores"][None, :])
            & np.isclose(det["boxes"][:, None, :], cand["boxes"][None, :, :], atol=1e-4).all(-1)
        )
        assert same.any(axis=1).all()
        assert cand["boxes"].max() <= 64 + 1e-4  # original-image pixels
        total += len(det["scores"])
    assert total > 0


def _engine_detections(model, dataset):
    loader = create_test_loader(dataset, batch_size=8, size_divisibility=32)
    return run_inference(model, loader, CPU)


def _direct_scores_and_correct(dataset, image_ids, detections, wanted_ids, min_score):
    """Scores and correctness of the detections of `wanted_ids` scoring >= min_score, matched
    without the driver: GT from the dataset's cleaned annotations, contiguous labels."""
    scores, correct = [], []
    for index, (image_id, det) in enumerate(zip(image_ids, detections, strict=True)):
        if image_id not in wanted_ids:
            continue
        gt = dataset.annotations(index)
        assert len(gt["crowd_boxes"]) == 0
        matches = match_detections_to_gt(
            det["boxes"], det["scores"], det["labels"], gt["boxes"], gt["labels"]
        )
        keep = det["scores"] >= min_score
        scores.append(det["scores"][keep])
        correct.append(matches.correct[keep])
    return np.concatenate(scores).astype(np.float64), np.concatenate(correct)


def test_tool_reports_calibration_of_each_checkpoint(tiny_checkpoint, tmp_path, capsys):
    # The tiny model knows nothing, so its detections are right only by chance: its scores are
    # shrunk towards its prior of 0.01 and every detection is kept (no score threshold, up to
    # 1000 per image), so that some are.
    state = load_checkpoint(tiny_checkpoint)
    state["model"]["head.cls_score.weight"] *= 0.2
    checkpoints = []
    for gamma in (2.0, 0.0):
        state["config"]["loss"]["gamma"] = gamma
        path = tmp_path / f"gamma{gamma:g}" / "model_final.pth"
        path.parent.mkdir()
        torch.save(state, path)
        checkpoints.append(path)

    out = tmp_path / "calibration"
    args = ["--weights", *map(str, checkpoints), "--output-dir", str(out), "--device", "cpu"]
    options = ["--bins", "50", "--seed", "1", "--min-score", "0.02"]
    assert cli(["calibrate", *args, *options, *KEEP_ALL]) == 0
    assert "gamma0" in capsys.readouterr().out

    names = ["gamma2", "gamma0"]
    with open(out / "calibration.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == TABLE_COLUMNS
    assert [r["model"] for r in rows] == names
    assert [float(r["gamma"]) for r in rows] == [2.0, 0.0]
    markdown = (out / "calibration.md").read_text()
    assert all(f"| {name} |" in markdown for name in names)
    # Same weights (only the stored gamma differs): the same anchor entropies, in (0, ln 2].
    entropies = [json.loads((out / n / "calibration.json").read_text())["entropy"] for n in names]
    assert entropies[0] == entropies[1]
    assert entropies[0]["num_foreground"] > 0 and entropies[0]["num_background"] > 0
    assert 0 < entropies[0]["foreground"] <= math.log(2) and 0 < entropies[0]["background"]
    assert float(rows[0]["entropy_background"]) == pytest.approx(entropies[0]["background"])
    assert (out / "entropy.png").stat().st_size > 0

    model, cfg, _ = load_trained_model(checkpoints[0], overrides=KEEP_ALL)
    dataset = build_dataset(resolve_data_paths(cfg), "val", training=False)
    fit_ids, eval_ids = split_image_ids(dataset.image_ids, 0.5, seed=1)
    record = json.loads((out / names[0] / "calibration.json").read_text())
    assert (record["fit_image_ids"], record["eval_image_ids"]) == (fit_ids, eval_ids)
    for key in ("before_nms", "after_nms", "temperature", "isotonic"):
        assert (out / names[0] / f"reliability_{key}.png").stat().st_size > 0
        result = record["calibration"][key]
        assert result["num_detections"] > 0, key
        assert 0 <= result["d_ece"] <= result["mce"] <= 1, key
        assert 0 <= result["brier"] <= 1, key
        assert sum(result["counts"]) == result["num_detections"], key
    # Pre-NMS candidates include every detection that survives NMS.
    assert (
        record["calibration"]["before_nms"]["num_detections"]
        >= record["calibration"]["after_nms"]["num_detections"]
    )

    image_ids, detections = _engine_detections(model, dataset)
    direct = calibration_metrics(
        *_direct_scores_and_correct(dataset, image_ids, detections, eval_ids, 0.02), 50, 0.0
    )
    after = record["calibration"]["after_nms"]
    assert after["num_detections"] == direct.num_detections
    assert after["counts"] == direct.counts.tolist()
    assert after["d_ece"] == pytest.approx(direct.d_ece, abs=1e-12)
    assert after["brier"] == pytest.approx(direct.brier, abs=1e-12)

    # The temperature is fitted on the fit images' detections scoring >= min_score.
    fit_scores, fit_correct = _direct_scores_and_correct(
        dataset, image_ids, detections, fit_ids, 0.02
    )
    temperature = fit_temperature(scores_to_logits(fit_scores), fit_correct)
    assert record["temperature"]["T"] == pytest.approx(temperature, rel=1e-9)
    assert record["temperature"]["error"] is None

    # AP on the evaluation images, and temperature scaling (monotone) leaves it unchanged.
    results = detections_to_coco_results(image_ids, detections, dataset.category_ids)
    metrics = evaluate_coco(dataset.coco, results, image_ids=eval_ids)
    coco = record["coco"]
    assert coco["after_nms"] == {"AP": metrics.AP, "AP50": metrics.AP50}
    assert metrics.AP50 > 0
    assert coco["temperature"] == coco["after_nms"]
    assert 0 <= coco["isotonic"]["AP"] <= 1


def test_tool_errors_name_the_problem(tiny_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "nope.pth")
    assert cli(["calibrate", "--weights", str(tiny_checkpoint), missing, "--output-dir", out]) == 1
    assert "nope.pth" in capsys.readouterr().err

    copy = tmp_path / tiny_checkpoint.parent.name / "model_final.pth"
    copy.parent.mkdir()
    copy.write_bytes(tiny_checkpoint.read_bytes())
    assert (
        cli(["calibrate", "--weights", str(tiny_checkpoint), str(copy), "--output-dir", out]) == 1
    )
    err = capsys.readouterr().err
    assert "would both be named" in err and str(copy) in err

    assert (
        cli(["calibrate", "--weights", str(tiny_checkpoint), "precision.amp=", "--output-dir", out])
        == 1
    )
    assert "put key=value overrides before --weights" in capsys.readouterr().err

    args = ["--weights", str(tiny_checkpoint), "--output-dir", out, "--device", "cpu"]
    assert cli(["calibrate", *args, "--min-score", "1.5"]) == 1
    assert "min_score" in capsys.readouterr().err


def _record(model, d_ece_after_nms, ap, loss=None):
    """A calibration record with the fields the tables read (other score sets' values fixed)."""
    calibration = {key: {"d_ece": 0.5, "mce": 0.6, "brier": 0.2} for key in SCORE_SETS}
    calibration["after_nms"] = {"d_ece": d_ece_after_nms, "mce": 0.6, "brier": 0.2}
    coco = {key: {"AP": ap, "AP50": ap} for key in ("after_nms", "temperature", "isotonic")}
    return {
        "model": model,
        "checkpoint": f"runs/{model}/model_final.pth",
        "loss": loss or {"modulation": "power", "gamma": 2.0, "alpha": 0.25, "label_smoothing": 0},
        "calibration": calibration,
        "temperature": {"T": 0.5},
        "coco": coco,
        "entropy": {"foreground": 0.3, "background": 0.01},
    }


def test_seed_summary_groups_ablate_runs_by_setting(tmp_path):
    flsd = {"modulation": "flsd", "gamma": 2.0, "alpha": 0.25, "label_smoothing": 0}
    records = [
        _record("focal_gamma2", 0.10, 0.30),
        _record("flsd53", 0.20, 0.20, flsd),
        _record("focal_gamma2_seed1", 0.14, 0.26),
        _record("focal_gamma2_seed2", 0.12, 0.28),
    ]
    paths = write_seed_summary(records, tmp_path)
    with open(paths["csv"], newline="") as f:
        rows = {r["setting"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["focal_gamma2", "flsd53"]
    focal = rows["focal_gamma2"]
    assert (focal["loss"], focal["seeds"]) == ("FL γ 2", "3")
    assert float(focal["d_ece_after_nms"]) == pytest.approx(0.12)
    assert float(focal["d_ece_after_nms_std"]) == pytest.approx(0.02)  # stdev of .10 .14 .12
    assert float(focal["ap"]) == pytest.approx(0.28)
    # one seed: a mean and no deviation; FLSD-53's unused loss.gamma is not shown as its gamma
    assert (rows["flsd53"]["loss"], rows["flsd53"]["d_ece_after_nms_std"]) == ("FLSD-53", "")
    markdown = paths["markdown"].read_text()
    assert "| focal_gamma2 | FL γ 2 | 0.25 | 3 |" in markdown and "0.120 ± 0.020" in markdown
    # single runs only: nothing to summarise, and no summary of an earlier run left behind
    assert write_seed_summary(records[:2], tmp_path) is None
    assert not paths["csv"].exists() and not paths["markdown"].exists()
    mixed = [records[0], _record("focal_gamma2_seed1", 0.1, 0.3, flsd)]
    with pytest.raises(ValueError, match="'focal_gamma2' were trained with different losses"):
        write_seed_summary(mixed, tmp_path)


@pytest.mark.parametrize(
    ("loss", "label"),
    [
        ({"modulation": "power", "gamma": 0.0, "label_smoothing": 0.0}, "CE"),
        ({"modulation": "power", "gamma": 0.0, "label_smoothing": 0.1}, "CE + LS 0.1"),
        ({"modulation": "power", "gamma": 3.0}, "FL γ 3"),
        ({"modulation": "flsd", "gamma": 2.0}, "FLSD-53"),
        ({"modulation": "gaussian", "gamma": 2.0}, "gaussian"),
        (
            {"modulation": "power", "gamma": 2.0, "gamma_schedule": "linear", "gamma_start": 0.0},
            "FL γ 0→2 (linear)",
        ),
        (
            {
                "modulation": "power",
                "gamma": 2.0,
                "gamma_schedule": "cosine",
                "gamma_start": 4.0,
                "alpha_start": 0.75,
            },
            "FL γ 4→2 (cosine, α 0.75→)",
        ),
    ],
)
def test_loss_label(loss, label):
    assert loss_label(loss) == label
