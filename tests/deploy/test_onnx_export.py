"""`retinanet export`: ONNX Runtime returns the PyTorch model's detections, on two image sizes
from one file, for a converted torchvision R50-FPN and a trained shapes model; the README's
ONNX example runs without torch."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import retinanet_resnet50_fpn

from retinanet.cli import main as cli
from retinanet.config import load_config
from retinanet.data.build import build_transform
from retinanet.deploy.onnx_export import ExportableRetinaNet, export_onnx
from retinanet.engine.checkpoint import load_trained_model
from retinanet.engine.trainer import train

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "model"))

from test_torchvision_equivalence import _randomise, _test_image  # noqa: E402


def _shapes_overrides(root: Path) -> list[str]:
    """The shapes recipe's architecture (ResNet-10 with BatchNorm, GroupNorm in the FPN and
    head, 64 channels, channels-last) with 2 head convs on 64 px images, tested at 96 px (the
    resize of the README example scales up). After 30 iterations the best scores are 0.1-0.2
    and 200-280 detections per image pass the 0.05 threshold: max_detections=300 keeps them
    all, so that no cut falls among the many near-equal scores of a barely trained model."""
    return [
        f"data.synthetic.root={root}",
        "data.synthetic.num_train=32",
        "data.synthetic.num_val=4",
        "data.synthetic.image_size=64",
        "data.num_workers=0",
        "model.fpn.channels=64",
        "model.head.num_convs=2",
        "model.anchors.sizes=[8,16,32,64,128]",
        "model.inference.max_detections=300",
        "input.min_size=64",
        "input.max_size=64",
        "input.test_min_size=96",
        "input.test_max_size=160",
        "input.size_divisibility=32",
        "train.batch_size=4",
        "train.max_iter=30",
        "train.base_lr=0.002",
        "train.warmup_iters=5",
        "train.log_period=20",
        "train.checkpoint_period=1000",
        "precision.amp=",
    ]


@pytest.fixture(scope="module")
def shapes_checkpoint(tmp_path_factory) -> Path:
    """A shapes-style model trained for 30 iterations (10-20 s on a 2-core CPU)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("shapes_run")
    cfg = load_config(REPO / "configs" / "shapes.yaml", _shapes_overrides(out / "data"))
    return train(cfg, out / "run", progress=False, evaluate=False).final_checkpoint


@pytest.fixture(scope="module")
def shapes_onnx(shapes_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shapes_onnx") / "model.onnx"
    assert cli(["export", "--weights", str(shapes_checkpoint), "--output", str(path)]) == 0
    return path


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _torch_detections(model, images: torch.Tensor, size_divisibility: int) -> list[dict]:
    """PyTorch's detections for a (B, 3, H, W) uint8 batch of one size, padded as collate pads."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (0, (-width) % size_divisibility, 0, (-height) % size_divisibility))
    sizes = torch.tensor([[height, width]] * len(images))
    return model.predict(padded, sizes)


def _matched(close: np.ndarray, order: np.ndarray) -> int:
    """Detections paired one-to-one, greedily in `order` of the expected detections."""
    taken = np.zeros(close.shape[1], dtype=bool)
    count = 0
    for i in order:
        free = np.flatnonzero(close[i] & ~taken)
        if len(free):
            taken[free[0]] = True
            count += 1
    return count


def _assert_onnx_matches(outputs, expected: list[dict], category_ids, min_detections: int):
    """ONNX Runtime's padded outputs against PyTorch's detections, image by image: the same
    labels (as category ids), boxes within 0.5 px, scores within 1e-3, >= 98 % of both sides
    paired one-to-one; padding rows zero with label -1; scores in decreasing order."""
    boxes, scores, labels, counts = outputs
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert labels.dtype == np.int64 and counts.dtype == np.int64
    for i, want in enumerate(expected):
        n = int(counts[i])
        assert (boxes[i, n:] == 0).all() and (scores[i, n:] == 0).all()
        assert (labels[i, n:] == -1).all()
        got_boxes, got_scores, got_labels = boxes[i, :n], scores[i, :n], labels[i, :n]
        assert (np.diff(got_scores) <= 0).all()
        want_boxes = want["boxes"].numpy()
        want_scores = want["scores"].numpy()
        want_labels = np.asarray(category_ids)[want["labels"].numpy()]
        assert len(want_scores) >= min_detections, "the comparison needs detections to compare"
        close = (
            (want_labels[:, None] == got_labels[None])
            & (np.abs(want_scores[:, None] - got_scores[None]) <= 1e-3)
            & (np.abs(want_boxes[:, None] - got_boxes[None]).max(-1) <= 0.5)
        )
        matched = _matched(close, np.argsort(-want_scores))
        assert matched >= 0.98 * max(n, len(want_scores)), (i, matched, n, len(want_scores))


def _val_images(checkpoint: Path) -> list[np.ndarray]:
    _, cfg, _ = load_trained_model(checkpoint)
    files = sorted(Path(cfg.data.synthetic.root, "val").glob("*.png"))
    return [np.ascontiguousarray(cv2.imread(str(f))[:, :, ::-1]) for f in files]


def _batch(images: list[np.ndarray], height: int, width: int) -> torch.Tensor:
    """(B, 3, height, width) uint8 RGB from images resized bilinearly."""
    resized = [cv2.resize(im, (width, height), interpolation=cv2.INTER_LINEAR) for im in images]
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous()


def test_shapes_model_onnx_runtime_equals_pytorch_on_two_sizes(shapes_checkpoint, shapes_onnx):
    model, cfg, classes = load_trained_model(shapes_checkpoint)
    session = _session(shapes_onnx)
    images = _val_images(shapes_checkpoint)[:2]
    # Sides that are not multiples of 32 (padding in the graph) and a batch of two.
    for height, width in [(96, 96), (80, 130)]:
        batch = _batch(images, height, width)
        with torch.no_grad():
            expected = _torch_detections(model, batch, cfg.input.size_divisibility)
        outputs = session.run(None, {"images": batch.float().numpy()})
        assert outputs[0].shape == (2, cfg.model.inference.max_detections, 4)
        _assert_onnx_matches(outputs, expected, classes.category_ids, min_detections=50)


def test_exported_graph_in_pytorch_equals_the_model(shapes_checkpoint):
    """The wrapper that is traced, run eagerly: the model's own detections, labels as
    category ids (the shapes dataset numbers its categories from 1)."""
    model, cfg, classes = load_trained_model(shapes_checkpoint)
    assert classes.category_ids == [i + 1 for i in range(classes.num_classes)]
    wrapper = ExportableRetinaNet(model, cfg.input.size_divisibility, classes.category_ids)
    batch = _batch(_val_images(shapes_checkpoint)[:2], 75, 100)
    with torch.no_grad():
        expected = _torch_detections(model, batch, cfg.input.size_divisibility)
        outputs = [t.numpy() for t in wrapper(batch.float())]
    _assert_onnx_matches(outputs, expected, classes.category_ids, min_detections=50)


def test_metadata_and_fixed_batch(shapes_checkpoint, shapes_onnx, tmp_path):
    _, cfg, classes = load_trained_model(shapes_checkpoint)
    meta = _session(shapes_onnx).get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == classes.names
    assert json.loads(meta["category_ids"]) == classes.category_ids
    assert (int(meta["min_size"]), int(meta["max_size"])) == (96, 160)
    assert int(meta["max_detections"]) == cfg.model.inference.max_detections

    fixed = tmp_path / "fixed.onnx"
    args = ["--weights", str(shapes_checkpoint), "--output", str(fixed), "--batch-size", "3"]
    assert cli(["export", *args, "--opset", "16"]) == 0
    graph = onnx.load(str(fixed))
    assert graph.opset_import[0].version == 16
    (image_input,) = graph.graph.input
    dims = [d.dim_value or d.dim_param for d in image_input.type.tensor_type.shape.dim]
    assert dims == [3, 3, "height", "width"]
    outputs = _session(fixed).run(None, {"images": np.zeros((3, 3, 64, 64), np.float32)})
    assert [o.shape[0] for o in outputs] == [3, 3, 3, 3]


def test_export_folds_the_norms_of_a_copy(shapes_checkpoint, shapes_onnx, tmp_path):
    ops = {node.op_type for node in onnx.load(str(shapes_onnx)).graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops  # folded into the convolutions
    model, cfg, classes = load_trained_model(shapes_checkpoint)
    model.train()
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = (cfg.input.size_divisibility, 96, 160)
    export_onnx(model, tmp_path / "copy.onnx", classes, *args)
    # the caller's model keeps its mode, its norms and its weights
    assert model.training and norms > 0
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == norms
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_export_refuses_a_graph_frozen_to_the_traced_size(shapes_checkpoint, monkeypatch, tmp_path):
    """A size read into Python (here: min() of top-k over a traced shape) would make the graph
    hold only for the traced input: the export fails instead of writing it."""
    import retinanet.model.postprocess as postprocess

    monkeypatch.setattr(postprocess, "_at_most", lambda limit, x, dim: min(limit, x.shape[dim]))
    model, cfg, classes = load_trained_model(shapes_checkpoint)
    output = tmp_path / "frozen.onnx"
    with pytest.raises(RuntimeError, match="only hold for the traced input size"):
        export_onnx(model, output, classes, cfg.input.size_divisibility, 96, 160)
    assert not output.exists()


def test_export_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    assert cli(["export", "--weights", str(missing), "--output", str(tmp_path / "m.onnx")]) == 1
    assert f"error: checkpoint not found: {missing}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["export", "--weights", str(missing), "--output", "m.onnx", "--batch-size", "0"])


def test_torchvision_r50_onnx_runtime_equals_pytorch_on_two_sizes(tmp_path):
    """A torchvision R50-FPN with seeded random weights and a class bias raised so that about
    400 (anchor, class) pairs of the first size pass the threshold, converted to ours and
    exported once."""
    torch.manual_seed(0)
    reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    scene = _test_image(tmp_path / "scene.png")
    sizes = [(320, 416), (256, 352)]
    first = _batch([scene], *sizes[0])[0]
    reference.transform.min_size, reference.transform.max_size = (320,), 416  # no resize
    _randomise(reference, first.float() / 255, num_candidates=400)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    convert = ["convert", "--from", "torchvision", str(tmp_path / "tv.pth")]
    assert cli([*convert, "--output", str(tmp_path / "ours.pth")]) == 0
    onnx_file = tmp_path / "r50.onnx"
    assert cli(["export", "--weights", str(tmp_path / "ours.pth"), "--output", str(onnx_file)]) == 0

    model, cfg, classes = load_trained_model(tmp_path / "ours.pth")
    session = _session(onnx_file)
    for height, width in sizes:
        batch = _batch([scene], height, width)
        with torch.no_grad():
            expected = _torch_detections(model, batch, cfg.input.size_divisibility)
        outputs = session.run(None, {"images": batch.float().numpy()})
        assert outputs[0].shape == (1, 300, 4)
        _assert_onnx_matches(outputs, expected, classes.category_ids, min_detections=30)


def _readme_section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("\n## Export to ONNX\n", 1)[1].split("\n## ", 1)[0]


# Run in the example's interpreter first: `import torch` (and torchvision) then fail.
_NO_TORCH = (
    "import sys\n"
    "sys.modules['torch'] = sys.modules['torchvision'] = None\n"
    "try:\n    import torch\nexcept ImportError:\n    pass\n"
    "else:\n    raise SystemExit('torch is importable')\n"
    "exec(compile(open('example.py').read(), 'example.py', 'exec'))\n"
)


def test_readme_example_runs_without_torch(shapes_checkpoint, tmp_path, monkeypatch):
    """The README's commands and Python example, verbatim, in a folder laid out as after the
    quickstart: the example's detections (its own resize, boxes scaled back to the image) are
    PyTorch's on the same image file."""
    section = _readme_section()
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    (export_line,) = [line for line in section.splitlines() if line.startswith("retinanet export")]
    image_file = re.search(r'cv2\.imread\("([^"]+)"\)', example).group(1)

    user = tmp_path / "user"
    checkpoint = user / "runs" / "quickstart" / "train" / "model_final.pth"
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(shapes_checkpoint, checkpoint)
    (user / image_file).parent.mkdir(parents=True)
    val_dir = Path(load_trained_model(shapes_checkpoint)[1].data.synthetic.root, "val")
    shutil.copy(sorted(val_dir.glob("*.png"))[0], user / image_file)
    monkeypatch.chdir(user)
    assert cli(shlex.split(export_line)[1:]) == 0
    (user / "example.py").write_text(example)
    run = subprocess.run(
        [sys.executable, "-c", _NO_TORCH], cwd=user, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]

    printed = [
        re.fullmatch(r"(\S+)\s+([\d.]+) \[([^\]]+)\]", line) for line in run.stdout.splitlines()
    ]
    assert printed and all(printed), run.stdout
    got_names = np.array([m.group(1) for m in printed])
    got_scores = np.array([float(m.group(2)) for m in printed])
    got_boxes = np.array([[float(v) for v in m.group(3).split(",")] for m in printed])

    model, cfg, classes = load_trained_model(checkpoint)
    rgb = np.ascontiguousarray(cv2.imread(str(user / image_file))[:, :, ::-1])
    resized, _, _ = build_transform(cfg, training=False)(rgb, np.zeros((0, 4), np.float32))
    assert resized.shape[:2] != rgb.shape[:2], "the example's resize is part of the test"
    batch = torch.from_numpy(resized).permute(2, 0, 1)[None].contiguous()
    d = cfg.input.size_divisibility
    padded = F.pad(batch, (0, (-batch.shape[3]) % d, 0, (-batch.shape[2]) % d))
    with torch.no_grad():
        (want,) = model.predict(
            padded, torch.tensor([resized.shape[:2]]), torch.tensor([rgb.shape[:2]])
        )
    want_names = np.array(classes.names)[want["labels"].numpy()]
    assert len(want_names) >= 10
    # The example prints scores to 1e-4 and boxes to 0.01 px.
    close = (
        (want_names[:, None] == got_names[None])
        & (np.abs(want["scores"].numpy()[:, None] - got_scores[None]) <= 1e-3 + 5e-5)
        & (np.abs(want["boxes"].numpy()[:, None] - got_boxes[None]).max(-1) <= 0.5)
    )
    matched = _matched(close, np.argsort(-want["scores"].numpy()))
    assert matched >= 0.98 * max(len(want_names), len(got_names))
