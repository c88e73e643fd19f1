"""The quickstart pipeline end to end on the tiny setting: every stage runs and writes what
summary.json lists; a second run continues from the finished training instead of retraining."""

import json
from pathlib import Path

from retinanet.cli import main as cli

from .conftest import SHAPES_CONFIG, tiny_overrides


def test_quickstart_runs_every_stage_and_lists_its_outputs(tmp_path, capsys):
    out = tmp_path / "qs"
    args = ["--output-dir", str(out), "--config", str(SHAPES_CONFIG), "--device", "cpu"]
    args += ["--num-predictions", "2", *tiny_overrides(tmp_path / "data"), "train.max_iter=2"]
    assert cli(["quickstart", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and 0 <= summary["AP"] <= 1
    assert set(summary["timings"]) == {
        "train_and_eval_s", "loss_analysis_s", "calibration_s", "predictions_s", "total_s"
    }  # fmt: skip
    outputs = summary["outputs"]
    for key in ("checkpoint", "metrics", "loss_cdf"):
        assert Path(outputs[key]).stat().st_size > 0, key
    assert (out / "calibration" / "calibration.md").is_file()
    predictions = json.loads((out / "predictions" / "predictions.json").read_text())
    assert len(predictions) == 2
    assert "AP" in capsys.readouterr().out

    # Again: the finished training is resumed at its last iteration (nothing is retrained) and
    # the analyses are redone.
    assert cli(["quickstart", *args]) == 0
    assert "at iteration 2" in capsys.readouterr().out
