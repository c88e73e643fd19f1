"""tools/predict.py on a video: a drawn video with the input's frame rate, size and frame count,
and one predictions.json entry per frame with its index, timestamp and that frame's
detections."""

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from retinanet import Detector
from retinanet.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from test_detector import tiny_checkpoint  # noqa: E402

FPS, FRAMES, HEIGHT, WIDTH = 10.0, 12, 96, 128


@pytest.fixture(autouse=True)
def _single_thread():
    # A tiny network: two OpenMP threads on a shared 2-core machine only add synchronisation.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_clip(path: Path) -> Path:
    """FRAMES frames of HEIGHT x WIDTH at FPS (mp4v): a rectangle moving right over a smooth
    gradient, so that every frame holds different detections."""
    rows = np.linspace(30, 150, HEIGHT, dtype=np.float32)[:, None, None]
    cols = np.linspace(0, 60, WIDTH, dtype=np.float32)[None, :, None]
    background = (rows + cols + np.array([0, 20, 40], np.float32)).astype(np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for i in range(FRAMES):
        frame = background.copy()
        cv2.rectangle(frame, (8 + 7 * i, 30), (40 + 7 * i, 70), (230, 240, 250), -1)
        writer.write(frame)
    writer.release()
    return path


def read_frames(path: Path) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), path
    fps, frames = capture.get(cv2.CAP_PROP_FPS), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames, fps


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("video") / "tiny.pth")


def test_predict_video_writes_drawn_video_and_per_frame_detections(checkpoint, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    args = ["--weights", str(checkpoint), "--input", str(clip), "--output", str(out)]
    # 12 frames in batches of 5: two full batches and a short one.
    assert (
        cli(["predict", *args, "--device", "cpu", "--batch-size", "5", "--score-threshold", "0.3"])
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["clip.mp4", "predictions.json"]

    entries = json.loads((out / "predictions.json").read_text())
    assert [e["frame"] for e in entries] == list(range(FRAMES))
    np.testing.assert_allclose(
        [e["timestamp"] for e in entries], np.arange(FRAMES) / FPS, atol=1e-6
    )
    assert {e["file_name"] for e in entries} == {"clip.mp4"}

    # Each entry holds its own frame's detections, as the Detector gives them for that frame.
    frames, _ = read_frames(clip)
    assert len(frames) == FRAMES
    detector = Detector.from_checkpoint(checkpoint, device="cpu", score_threshold=0.0, batch_size=5)
    expected = detector(frames)
    assert len({d.scores.tobytes() for d in expected}) == FRAMES  # the frames differ
    for entry, det in zip(entries, expected, strict=True):
        assert len(det) >= 10
        np.testing.assert_allclose(entry["boxes"], det.boxes, rtol=0, atol=6e-4)
        np.testing.assert_allclose(entry["scores"], det.scores, rtol=0, atol=6e-6)
        assert entry["labels"] == det.labels.tolist() and entry["class_names"] == det.names

    drawn, fps = read_frames(out / "clip.mp4")
    assert fps == pytest.approx(FPS)
    assert len(drawn) == FRAMES
    assert {f.shape for f in drawn} == {(HEIGHT, WIDTH, 3)}
    # Boxes were drawn: the output differs from the input by more than the codec's noise.
    drawn_pixels = [
        np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16)) > 40)
        for a, b in zip(drawn, frames, strict=True)
    ]
    assert min(drawn_pixels) > 0.05


def test_unreadable_or_missing_video_is_an_error_naming_it(checkpoint, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x01 this is not a video" * 100)
    out = tmp_path / "out"
    base = ["predict", "--weights", str(checkpoint), "--output", str(out), "--device", "cpu"]
    assert cli([*base, "--input", str(bad)]) == 1
    assert "broken.mp4" in capsys.readouterr().err
    assert not (out / "predictions.json").exists()
    assert not out.exists() or not any(out.iterdir())

    assert cli([*base, "--input", str(tmp_path / "missing.mp4")]) == 1
    assert "missing.mp4" in capsys.readouterr().err
