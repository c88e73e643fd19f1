"""tools/convert.py + tools/predict.py reproduce torchvision's detections on a PNG file."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn

from retinanet.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "model"))

from test_torchvision_equivalence import _assert_same_detections, _randomise, _test_image  # noqa: E402


def test_convert_then_predict_matches_torchvision(tmp_path):
    torch.manual_seed(0)
    reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    inputs = tmp_path / "images"
    inputs.mkdir()
    rgb = _test_image(inputs / "scene.png")
    image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    _randomise(reference, image)
    # torchvision's COCO weights are loaded with BatchNorm eps 0, which the converted config
    # reproduces; _randomise set the same eps on the reference model.
    torch.save(reference.state_dict(), tmp_path / "tv.pth")

    assert (
        cli(
            [
                "convert",
                "--from",
                "torchvision",
                str(tmp_path / "tv.pth"),
                "--output",
                str(tmp_path / "ours.pth"),
            ]
        )
        == 0
    )
    out = tmp_path / "predictions"
    args = ["--weights", str(tmp_path / "ours.pth"), "--input", str(inputs), "--output", str(out)]
    assert cli(["predict", *args, "--score-threshold", "0.06", "--device", "cpu"]) == 0

    entries = json.loads((out / "predictions.json").read_text())
    assert [e["file_name"] for e in entries] == ["scene.png"]
    assert (out / "scene.png").is_file()
    with torch.no_grad():
        expected = reference([image])[0]
    got = {
        "boxes": torch.tensor(entries[0]["boxes"]),
        "scores": torch.tensor(entries[0]["scores"]),
        # Labels are written as category ids, which for torchvision's 91 classes are its labels.
        "labels": torch.tensor(entries[0]["labels"]),
    }
    assert len(got["boxes"]) == len(expected["boxes"]) >= 30
    # The JSON rounds boxes to 1e-3 px and scores to 1e-5, inside the tolerances.
    _assert_same_detections(got, expected, box_atol=0.01, score_atol=1e-4)


def test_convert_errors_name_the_file(tmp_path, capsys):
    assert (
        cli(
            [
                "convert",
                "--from",
                "torchvision",
                str(tmp_path / "nope.pth"),
                "--output",
                str(tmp_path / "o.pth"),
            ]
        )
        == 1
    )
    assert "nope.pth" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    assert (
        cli(["convert", "--from", "torchvision", str(bad), "--output", str(tmp_path / "o.pth")])
        == 1
    )
    assert "fc.weight" in capsys.readouterr().err  # the key that gives it away
    assert not (tmp_path / "o.pth").exists()


def test_predict_refuses_to_overwrite_inputs(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    assert (
        cli(["predict", "--weights", "w.pth", "--input", str(tmp_path), "--output", str(tmp_path)])
        == 1
    )
    assert "overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["missing.png"])
def test_predict_missing_input(tmp_path, capsys, bad):
    assert (
        cli(
            [
                "predict",
                "--weights",
                "w.pth",
                "--input",
                str(tmp_path / bad),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert bad in capsys.readouterr().err


def test_convert_into_an_architecture_that_does_not_fit_names_the_config(tmp_path, capsys):
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    config = REPO / "configs" / "shapes.yaml"  # ResNet-10 with 64 channels: nothing fits
    args = ["convert", "--from", "torchvision", str(tmp_path / "tv.pth")]
    assert cli([*args, "--output", str(tmp_path / "o.pth"), "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"tv.pth (config {config}) does not fit" in err and "shapes differ" in err
    assert not (tmp_path / "o.pth").exists()
