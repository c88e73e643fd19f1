"""retinanet.Detector: paths, BGR and RGB arrays and lists of them give the same detections,
boxes come back in original-image pixels, lists are batched, the checkpoint's precision is used,
and bad inputs are errors that name them."""

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from retinanet import Detector
from retinanet.cli import main as cli
from retinanet.config import load_config
from retinanet.data import resized_shape
from retinanet.data.classes import ClassInfo
from retinanet.engine.checkpoint import load_checkpoint, save_checkpoint
from retinanet.model.build import build_model

REPO = Path(__file__).resolve().parents[1]
NAMES = ["circle", "square", "triangle"]
# Not 0, 1, 2: results must carry the dataset's category ids, not the model's class indices.
CATEGORY_IDS = [3, 7, 11]


def tiny_checkpoint(path: Path) -> Path:
    """A seeded random ResNet-10 RetinaNet (16 channels, one head conv, 64 px test size) saved
    as a checkpoint of ours. Like a trained detector it returns dozens of detections with
    distinct scores from 0.05 to near 1: He-initialised head convs, a wide class-logit spread
    and a class bias that lets about 150 (anchor, class) pairs of a reference image pass 0.05."""
    cfg = load_config(
        REPO / "configs" / "shapes.yaml",
        [
            "model.fpn.channels=16",
            "model.fpn.norm=",
            "model.head.norm=",
            "model.head.num_convs=1",
            "model.anchors.sizes=[8,16,32,64,128]",
            "input.min_size=[64]",
            "input.max_size=64",
            "input.test_min_size=64",
            "input.test_max_size=64",
            "input.size_divisibility=32",
            "precision.amp=",
            "precision.channels_last=false",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg, len(NAMES), load_backbone_weights=False).eval()
    with torch.no_grad():
        for conv in model.head.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight)
        model.head.cls_score.weight.mul_(4)
        model.head.cls_score.bias.zero_()
        model.head.box_pred.weight.mul_(0.01)  # boxes near their anchors, as after training
        image = torch.from_numpy(scene(64, 64, seed=0)).permute(2, 0, 1)[None]
        logits = model(image, torch.tensor([[64, 64]])).cls_logits.flatten()
        threshold_logit = math.log(0.05 / 0.95)
        model.head.cls_score.bias.fill_(threshold_logit - float(logits.topk(150).values[-1]))
    return save_checkpoint(path, model, cfg, ClassInfo(NAMES, CATEGORY_IDS), iteration=0)


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 BGR: a smooth random background with a few filled rectangles."""
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.uniform(0, 160, (6, 8, 3)).astype(np.float32), (width, height))
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 12)), int(rng.integers(0, height - 12))
        x1, y1 = x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))
        cv2.rectangle(
            image, (x0, y0), (x1, y1), tuple(float(c) for c in rng.integers(0, 255, 3)), -1
        )
    return image.astype(np.uint8)


@pytest.fixture(autouse=True)
def _single_thread():
    # A tiny network: two OpenMP threads on a shared 2-core machine only add synchronisation.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("detector") / "tiny.pth")


@pytest.fixture(scope="module")
def detector(checkpoint):
    return Detector.from_checkpoint(checkpoint, device="cpu", score_threshold=0.0)


def assert_same(a, b, box_atol=0.0, score_atol=0.0):
    assert len(a) == len(b)
    np.testing.assert_allclose(a.boxes, b.boxes, rtol=0, atol=box_atol)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=score_atol)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.names == b.names


def test_import_retinanet_stays_light_and_exports_detector():
    code = "import sys, retinanet; assert 'torch' not in sys.modules, 'torch'; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    import retinanet
    from retinanet.detector import Detections, Detector

    assert retinanet.Detector is Detector and retinanet.Detections is Detections
    with pytest.raises(AttributeError, match="Detecter"):
        retinanet.Detecter  # noqa: B018


def test_path_bgr_array_and_rgb_array_give_the_same_detections(detector, tmp_path):
    bgr = scene(96, 128, seed=1)
    cv2.imwrite(str(tmp_path / "scene.png"), bgr)  # lossless: the file holds the same pixels
    from_path = detector(tmp_path / "scene.png")
    assert len(from_path) >= 10
    assert_same(from_path, detector(str(tmp_path / "scene.png")))
    assert_same(from_path, detector(bgr))
    assert_same(from_path, detector(np.ascontiguousarray(bgr[:, :, ::-1]), rgb=True))
    # The channel order is honoured: the same array read as RGB is another image.
    assert not np.array_equal(detector(bgr, rgb=True).scores, from_path.scores)

    assert from_path.boxes.dtype == np.float32 and from_path.boxes.shape == (len(from_path), 4)
    assert np.all(np.diff(from_path.scores) <= 0)  # highest score first
    assert set(from_path.labels.tolist()) <= set(CATEGORY_IDS)
    assert from_path.names == [NAMES[CATEGORY_IDS.index(c)] for c in from_path.labels]
    np.testing.assert_array_equal(
        from_path.class_indices, [CATEGORY_IDS.index(c) for c in from_path.labels]
    )


def test_boxes_are_in_original_image_pixels(detector):
    bgr = scene(96, 128, seed=2)
    # The test-time resize takes 96 x 128 to 48 x 64; an image already 48 x 64 is not resized,
    # so the network sees the same pixels and only the box scale differs, by exactly 2.
    assert resized_shape(96, 128, 64, 64) == (48, 64)
    small = cv2.resize(bgr, (64, 48), interpolation=cv2.INTER_LINEAR)
    original, resized = detector(bgr), detector(small)
    assert len(original) >= 10
    np.testing.assert_allclose(original.boxes, resized.boxes * 2, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(original.scores, resized.scores)
    np.testing.assert_array_equal(original.labels, resized.labels)
    # Inside the original image, and beyond the resized one.
    assert original.boxes.min() >= 0
    assert original.boxes[:, [0, 2]].max() <= 128 and original.boxes[:, [1, 3]].max() <= 96
    assert original.boxes[:, 2].max() > 64 or original.boxes[:, 3].max() > 48


def test_a_list_is_batched_and_equals_one_by_one(checkpoint, tmp_path):
    detector = Detector.from_checkpoint(checkpoint, device="cpu", score_threshold=0.2, batch_size=3)
    cv2.imwrite(str(tmp_path / "a.png"), scene(64, 64, seed=4))
    # Four sizes that all pad to 64 x 64, so batching changes no pixel the network sees.
    images = [scene(96, 128, seed=3), tmp_path / "a.png", scene(128, 96, seed=5), scene(50, 70, 6)]
    batch_sizes = []
    hook = detector.model.register_forward_hook(
        lambda m, args, out: batch_sizes.append(len(args[0]))
    )
    try:
        batched = detector(images)
        assert batch_sizes == [3, 1]
        singles = [detector(image) for image in images]
    finally:
        hook.remove()
    assert len(batched) == 4 and sum(len(d) for d in batched) >= 20
    for together, alone in zip(batched, singles, strict=True):
        assert together.scores.min() >= 0.2
        assert_same(together, alone, box_atol=1e-3, score_atol=1e-5)
    assert [len(d) for d in detector(tuple(images))] == [len(d) for d in batched]
    assert detector([]) == []


def test_precision_and_config_from_the_checkpoint(checkpoint, detector):
    assert detector.amp is None and detector.config.input.test_max_size == 64
    image = scene(96, 128, seed=7)
    bf16 = Detector.from_checkpoint(
        checkpoint, device="cpu", score_threshold=0.0, overrides=["precision.amp=bf16"]
    )
    assert bf16.amp == "bf16"
    fp32, reduced = detector(image), bf16(image)
    assert len(reduced) >= 10
    # The network ran in bf16: scores move by bf16's rounding, not more.
    assert not np.array_equal(fp32.scores[:5], reduced.scores[:5])
    assert abs(float(fp32.scores[0]) - float(reduced.scores[0])) < 0.05
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Detector.from_checkpoint(checkpoint, device="cpu", overrides=["precision.amp=fp16"])


def test_from_checkpoint_folds_the_backbone_norms(checkpoint, tmp_path):
    # BatchNorm statistics and affine parameters away from their initial 0 / 1, so that a fold
    # that got the scale or the shift wrong changes the detections.
    state = load_checkpoint(checkpoint)
    g = torch.Generator().manual_seed(0)
    for key, value in state["model"].items():
        if not (key.startswith("backbone.") and value.dtype == torch.float32):
            continue
        if key.endswith("running_mean") or (key.endswith(".bias") and value.dim() == 1):
            value.add_(0.1 * torch.randn(value.shape, generator=g))
        elif key.endswith("running_var"):
            value.mul_(0.5 + torch.rand(value.shape, generator=g))
    torch.save(state, tmp_path / "stats.pth")
    folded = Detector.from_checkpoint(tmp_path / "stats.pth", device="cpu", score_threshold=0.0)
    exact = Detector.from_checkpoint(
        tmp_path / "stats.pth", device="cpu", score_threshold=0.0, fold_norms=False
    )
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in exact.model.modules())
    image = scene(96, 128, seed=3)
    assert len(exact(image)) >= 10
    assert_same(folded(image), exact(image), box_atol=1e-3, score_atol=1e-5)


def test_the_score_threshold_drops_weaker_detections(checkpoint, detector):
    image = scene(96, 128, seed=8)
    everything = detector(image)
    strict = Detector.from_checkpoint(checkpoint, device="cpu", score_threshold=0.3)(image)
    keep = everything.scores >= 0.3
    assert 0 < keep.sum() < len(everything)
    np.testing.assert_array_equal(strict.boxes, everything.boxes[keep])
    np.testing.assert_array_equal(strict.labels, everything.labels[keep])


def test_bad_inputs_are_errors_that_name_them(checkpoint, detector, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        detector(tmp_path / "nope.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        detector([scene(64, 64, 0), tmp_path / "notes.png"])
    with pytest.raises(ValueError, match=r"images\[1\].*float32"):
        detector([scene(64, 64, 0), np.zeros((64, 64, 3), np.float32)])
    with pytest.raises(ValueError, match=r"shape \(64, 64\)"):
        detector(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(64, 64, 4\)"):
        detector(np.zeros((64, 64, 4), np.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        detector(torch.zeros(64, 64, 3, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Detector.from_checkpoint(tmp_path / "missing.pth", device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        Detector.from_checkpoint(checkpoint, device="cpu", batch_size=0)


def test_predict_command_writes_the_detectors_detections(checkpoint, detector, tmp_path):
    inputs = tmp_path / "images"
    inputs.mkdir()
    for i, (h, w) in enumerate([(96, 128), (64, 64), (80, 60)]):
        cv2.imwrite(str(inputs / f"{i}.png"), scene(h, w, seed=10 + i))
    out = tmp_path / "out"
    args = ["--weights", str(checkpoint), "--input", str(inputs), "--output", str(out)]
    assert cli(["predict", *args, "--device", "cpu", "--batch-size", "1"]) == 0

    entries = json.loads((out / "predictions.json").read_text())
    assert [e["file_name"] for e in entries] == ["0.png", "1.png", "2.png"]
    for entry in entries:
        expected = detector(inputs / entry["file_name"])
        assert len(expected) >= 10
        # The JSON rounds boxes to 1e-3 px and scores to 1e-5.
        np.testing.assert_allclose(entry["boxes"], expected.boxes, rtol=0, atol=6e-4)
        np.testing.assert_allclose(entry["scores"], expected.scores, rtol=0, atol=6e-6)
        assert entry["labels"] == expected.labels.tolist()
        assert entry["class_names"] == expected.names
        drawn = cv2.imread(str(out / entry["file_name"]))
        assert drawn.shape == cv2.imread(str(inputs / entry["file_name"])).shape
