"""The assembled detector: prior at initialisation, padding, batch vs single image, learning."""

import cv2
import pytest
import torch
from torchvision.ops import box_iou

from retinanet.config import load_config
from retinanet.model.build import build_model
from retinanet.model.retinanet import RetinaNet


def _small_model(num_classes: int = 3, *overrides: str) -> RetinaNet:
    """ResNet-18 with random weights (nothing is downloaded) and a narrow FPN and head."""
    cfg = load_config(
        None,
        [
            "model.backbone.depth=18",
            "model.backbone.weights=''",
            "model.fpn.channels=32",
            *overrides,
        ],
    )
    return build_model(cfg, num_classes)


def _coco_photo(coco_tiny_dir, size=(320, 256)) -> torch.Tensor:
    """A real val2017 photo resized to size (W, H): (3, H, W) uint8 RGB."""
    path = sorted((coco_tiny_dir / "val2017").glob("*.jpg"))[0]
    bgr = cv2.resize(cv2.imread(str(path), cv2.IMREAD_COLOR), size)
    return torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1)


def test_initial_class_probabilities_equal_the_prior(coco_tiny_dir):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.backbone.depth=18", "model.backbone.weights=''"])
    model = build_model(cfg, num_classes=80).eval()  # the paper's 256-channel head
    image = _coco_photo(coco_tiny_dir)[None]
    with torch.no_grad():
        outputs = model(image, torch.tensor([[256, 320]]))
    probabilities = torch.sigmoid(outputs.cls_logits)
    assert probabilities.shape == (1, 9 * (32 * 40 + 16 * 20 + 8 * 10 + 4 * 5 + 2 * 3), 80)
    # Every (anchor, class) starts at pi = 0.01: the tiny head weights barely move the bias.
    assert probabilities.mean().item() == pytest.approx(0.01, rel=0.02)
    assert probabilities.std().item() < 5e-4
    assert 0.008 < probabilities.min().item() and probabilities.max().item() < 0.012


def test_normalisation_zeroes_the_padding():
    model = _small_model()
    images = torch.full((2, 3, 8, 10), 200, dtype=torch.uint8)
    normalized = model.normalize(images, torch.tensor([[8, 10], [5, 7]]))
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    inside = ((200 - mean) / std).expand(3, 8, 10)
    torch.testing.assert_close(normalized[0], inside)
    torch.testing.assert_close(normalized[1, :, :5, :7], inside[:, :5, :7])
    assert (normalized[1, :, 5:] == 0).all() and (normalized[1, :, :, 7:] == 0).all()


def test_forward_shapes_and_finite_losses_with_an_empty_image():
    torch.manual_seed(0)
    model = _small_model(4, "model.backbone.freeze_at=0").train()
    images = torch.randint(0, 256, (2, 3, 128, 256), dtype=torch.uint8)
    outputs = model(images, torch.tensor([[128, 256], [100, 200]]))
    feature_sizes = [(16, 32), (8, 16), (4, 8), (2, 4), (1, 2)]
    assert outputs.num_anchors_per_level == [9 * h * w for h, w in feature_sizes]
    total = sum(outputs.num_anchors_per_level)
    assert outputs.anchors.shape == (total, 4)
    assert outputs.cls_logits.shape == (2, total, 4) and outputs.box_deltas.shape == (2, total, 4)
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 90.0, 70.0]]), "labels": torch.tensor([3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    losses = model.losses(outputs, targets)
    total_loss = losses["loss_cls"] + losses["loss_box"]
    assert torch.isfinite(total_loss) and losses["loss_box"] > 0
    total_loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def _assert_same_detections(got, expected):
    """One-to-one: same label, score within 1e-5, box within 1e-3 px."""
    assert len(got["boxes"]) == len(expected["boxes"]) > 0
    close = (
        (got["labels"][:, None] == expected["labels"][None, :])
        & ((got["scores"][:, None] - expected["scores"][None, :]).abs() <= 1e-5)
        & ((got["boxes"][:, None] - expected["boxes"][None, :]).abs().amax(-1) <= 1e-3)
    )
    assert (close.sum(0) == 1).all() and (close.sum(1) == 1).all()


def test_batch_detections_equal_single_image_detections():
    torch.manual_seed(0)
    model = _small_model().eval()
    with torch.no_grad():  # spread the class logits so that many anchors pass 0.05
        model.head.cls_score.weight.normal_(0, 0.3)
        model.head.cls_score.bias.zero_()
    g = torch.Generator().manual_seed(0)
    wide = torch.randint(0, 256, (3, 256, 384), generator=g, dtype=torch.uint8)
    square = torch.randint(0, 256, (3, 256, 256), generator=g, dtype=torch.uint8)
    # Both sizes are multiples of 128, so neither image is padded when alone; in the batch
    # the square one is padded on the right to 384.
    batch = torch.zeros(2, 3, 256, 384, dtype=torch.uint8)
    batch[0], batch[1, :, :, :256] = wide, square
    sizes = torch.tensor([[256, 384], [256, 256]])
    originals = torch.tensor([[512, 768], [128, 128]])
    batched = model.predict(batch, sizes, originals)

    wide_alone = model.predict(wide[None], sizes[:1], originals[:1])[0]
    _assert_same_detections(batched[0], wide_alone)
    # Convolutions near the square image's right border see the batch's padding rather than
    # their own zero padding, so that image alone is compared with the same padding.
    square_padded = model.predict(batch[1:], sizes[1:], originals[1:])[0]
    _assert_same_detections(batched[1], square_padded)
    # Boxes are clipped to each image's own size before scaling (x 2 for the wide image,
    # x 0.5 for the square one).
    assert batched[0]["boxes"][:, 2].max() <= 768 and batched[1]["boxes"][:, 2].max() <= 128


def _shapes_image(size: int = 128):
    """A grey image with a red, a green and a blue rectangle, and their boxes and labels."""
    image = torch.full((1, 3, size, size), 100, dtype=torch.uint8)
    boxes = torch.tensor([[8.0, 16.0, 56.0, 72.0], [72.0, 24.0, 120.0, 88.0], [24, 88, 104, 120]])
    labels = torch.tensor([0, 2, 1])
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for (x1, y1, x2, y2), colour in zip(boxes.int().tolist(), colours, strict=True):
        image[0, :, y1:y2, x1:x2] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
    return image, boxes, labels


def test_the_model_overfits_one_image():
    torch.manual_seed(0)
    # GroupNorm: batch-independent, so the eval-mode network is the one that was trained.
    model = _small_model(3, "model.backbone.norm=gn", "model.backbone.freeze_at=2")
    image, boxes, labels = _shapes_image()
    sizes = torch.tensor([[128, 128]])
    targets = [{"boxes": boxes, "labels": labels}]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    model.train()
    history = []
    for _ in range(150):
        losses = model.losses(model(image, sizes), targets)
        loss = losses["loss_cls"] + losses["loss_box"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < history[0] / 8, history[::10]

    model.eval()
    detections = model.predict(image, sizes)[0]
    iou = box_iou(boxes, detections["boxes"])  # (3 ground truth, N detections)
    for i in range(len(boxes)):
        # A confident detection of the right class on every object...
        hits = (iou[i] > 0.5) & (detections["labels"] == labels[i])
        assert hits.any() and detections["scores"][hits].max() > 0.5, f"object {i}"
        # ...and no detection of a wrong class overlapping it more confidently.
        wrong = (iou[i] > 0.5) & (detections["labels"] != labels[i])
        if wrong.any():
            assert detections["scores"][wrong].max() < detections["scores"][hits].max()


def test_head_outputs_and_detections_are_fp32_under_autocast():
    from retinanet.config import load_config
    from retinanet.model.build import build_model

    cfg = load_config(
        None, ["model.backbone.weights=", "model.backbone.depth=18", "model.fpn.channels=32"]
    )
    torch.manual_seed(0)
    model = build_model(cfg, 3).eval()
    images = torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8)
    sizes = torch.tensor([[128, 128]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images, sizes)
        detections = model.detect(outputs, sizes, sizes * 8)
    # bf16 would round coordinates of ~1000 px to multiples of 4-8 px.
    assert outputs.cls_logits.dtype == outputs.box_deltas.dtype == torch.float32
    assert detections[0]["boxes"].dtype == torch.float32
