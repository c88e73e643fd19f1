"""RetinaNet criterion: targets, normalisation, empty images, batch vs single image."""

import pytest
import torch
from torchvision.ops import generalized_box_iou_loss

from retinanet.model.anchors import AnchorGenerator
from retinanet.model.box_coding import BoxCoder
from retinanet.model.criterion import RetinaNetCriterion
from retinanet.model.losses import GammaSchedule, PowerFactor, sigmoid_focal_loss
from retinanet.model.matcher import BACKGROUND, IGNORE, AnchorMatcher

NUM_CLASSES = 3
ANCHORS = AnchorGenerator()((128, 128), [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)])


def _criterion(**kwargs) -> RetinaNetCriterion:
    return RetinaNetCriterion(AnchorMatcher(), BoxCoder(), **kwargs)


def _head_outputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cls_logits = (torch.randn(batch, len(ANCHORS), NUM_CLASSES, generator=g) - 2).requires_grad_()
    box_deltas = (0.3 * torch.randn(batch, len(ANCHORS), 4, generator=g)).requires_grad_()
    return cls_logits, box_deltas


TARGETS = [
    {
        "boxes": torch.tensor([[10.0, 12.0, 60.0, 50.0], [70.0, 20.0, 126.0, 110.0]]),
        "labels": torch.tensor([2, 0]),
    },
    {"boxes": torch.tensor([[30.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([1])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
]


def test_losses_equal_the_reference_formula():
    cls_logits, box_deltas = _head_outputs(3)
    losses = _criterion()(cls_logits, box_deltas, ANCHORS, TARGETS)

    # The same quantities written directly from the matcher's output.
    matcher = AnchorMatcher()
    loss_cls = loss_box = num_fg = 0.0
    for i, target in enumerate(TARGETS):
        boxes = target["boxes"] if len(target["boxes"]) else torch.full((1, 4), -1e6)
        matches = matcher(ANCHORS, boxes[None])[0]
        fg = matches >= 0
        one_hot = torch.zeros(len(ANCHORS), NUM_CLASSES)
        one_hot[fg, target["labels"][matches[fg]]] = 1.0
        per_element = sigmoid_focal_loss(cls_logits[i], one_hot, 0.25, 2.0)
        loss_cls = loss_cls + per_element[matches != IGNORE].sum()
        encoded = BoxCoder().encode(ANCHORS[fg], boxes[matches[fg]])
        loss_box = loss_box + (box_deltas[i][fg] - encoded).abs().sum()
        num_fg += int(fg.sum())
    assert num_fg > 0
    torch.testing.assert_close(losses["loss_cls"], loss_cls / num_fg, rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["loss_box"], loss_box / num_fg, rtol=1e-5, atol=0)
    assert losses["num_foreground"].item() == pytest.approx(num_fg / 3)


def test_image_without_boxes():
    cls_logits, box_deltas = _head_outputs(1)
    losses = _criterion()(cls_logits, box_deltas, ANCHORS, TARGETS[2:])
    assert losses["loss_box"].item() == 0.0 and losses["num_foreground"].item() == 0.0
    # Every anchor is background and the normaliser is clamped to 1.
    expected = sigmoid_focal_loss(cls_logits, torch.zeros_like(cls_logits)).sum()
    torch.testing.assert_close(losses["loss_cls"], expected, rtol=1e-5, atol=0)
    (losses["loss_cls"] + losses["loss_box"]).backward()
    assert torch.isfinite(cls_logits.grad).all() and cls_logits.grad.abs().sum() > 0
    assert torch.isfinite(box_deltas.grad).all() and (box_deltas.grad == 0).all()


@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou"])
def test_batch_equals_images_weighted_by_their_foreground_counts(box_loss):
    # With the num_foreground normaliser the batch loss is (sum of per-image sums) / (total
    # fg), so loss_batch * total_fg == sum_i loss_i * fg_i, values and gradients, while the
    # plain mean of per-image losses would differ.
    criterion = _criterion(box_loss=box_loss)
    cls_logits, box_deltas = _head_outputs(3, seed=1)
    batch = criterion(cls_logits, box_deltas, ANCHORS, TARGETS)
    total_fg = batch["num_foreground"] * 3
    batch_terms = [batch[k] * total_fg for k in ("loss_cls", "loss_box")]
    batch_grads = torch.autograd.grad(sum(batch_terms), [cls_logits, box_deltas])

    single_terms = [0.0, 0.0]
    per_image_cls = []
    single_grads = [torch.zeros_like(cls_logits), torch.zeros_like(box_deltas)]
    for i, target in enumerate(TARGETS):
        logits_i = cls_logits[i : i + 1].detach().requires_grad_()
        deltas_i = box_deltas[i : i + 1].detach().requires_grad_()
        single = criterion(logits_i, deltas_i, ANCHORS, [target])
        fg = single["num_foreground"]
        per_image_cls.append(single["loss_cls"].detach())
        terms = [single[k] * fg for k in ("loss_cls", "loss_box")]
        # An image without boxes has fg 0 but keeps its focal loss, normalised by 1.
        if fg == 0:
            terms[0] = single["loss_cls"]
        grads = torch.autograd.grad(sum(terms), [logits_i, deltas_i])
        single_terms = [a + b.detach() for a, b in zip(single_terms, terms, strict=True)]
        single_grads[0][i], single_grads[1][i] = grads[0][0], grads[1][0]

    for got, want in zip(batch_terms, single_terms, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(batch_grads, single_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batch["loss_cls"], torch.stack(per_image_cls).mean(), rtol=0.01)


def test_giou_box_loss_on_decoded_boxes():
    cls_logits, box_deltas = _head_outputs(1, seed=2)
    target = TARGETS[:1]
    losses = _criterion(box_loss="giou", box_loss_weight=2.0)(
        cls_logits, box_deltas, ANCHORS, target
    )
    matches = AnchorMatcher()(ANCHORS, target[0]["boxes"][None])[0]
    fg = matches >= 0
    decoded = BoxCoder().decode(box_deltas[0][fg], ANCHORS[fg])
    expected = generalized_box_iou_loss(decoded, target[0]["boxes"][matches[fg]], reduction="sum")
    torch.testing.assert_close(losses["loss_box"], 2.0 * expected / fg.sum(), rtol=1e-5, atol=0)


def test_crowd_boxes_remove_background_anchors_from_the_loss():
    cls_logits, box_deltas = _head_outputs(1, seed=3)
    plain = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([0])}
    crowd = dict(plain, crowd_boxes=torch.tensor([[60.0, 60.0, 128.0, 128.0]]))
    criterion = _criterion()
    matches, classes, _ = criterion.match(ANCHORS, [crowd])
    newly_ignored = (classes == IGNORE) & (criterion.match(ANCHORS, [plain])[1] == BACKGROUND)
    assert newly_ignored.sum() > 0
    # Removing those anchors removes exactly their (all-negative) focal terms.
    removed = sigmoid_focal_loss(cls_logits[newly_ignored], torch.zeros(1, NUM_CLASSES)).sum()
    with_crowd = criterion(cls_logits, box_deltas, ANCHORS, [crowd])["loss_cls"]
    without = criterion(cls_logits, box_deltas, ANCHORS, [plain])["loss_cls"]
    num_fg = (matches >= 0).sum()
    torch.testing.assert_close(without - with_crowd, removed / num_fg, rtol=1e-4, atol=1e-6)
    # In a batch, images without crowd boxes (key absent, None or empty) ignore nothing.
    for other in (plain, dict(plain, crowd_boxes=None), dict(plain, crowd_boxes=torch.zeros(0, 4))):
        batch_classes = criterion.match(ANCHORS, [crowd, other])[1]
        assert torch.equal(batch_classes[0], classes[0])
        assert torch.equal(batch_classes[1], criterion.match(ANCHORS, [plain])[1][0])


def test_ema_normaliser_updates_in_training_only():
    criterion = _criterion(normalizer="ema", ema_momentum=0.9, ema_initial=100.0)
    cls_logits, box_deltas = _head_outputs(2)
    targets = TARGETS[:2]
    fixed = _criterion()(cls_logits, box_deltas, ANCHORS, targets)
    num_fg = fixed["num_foreground"].item() * 2
    raw_cls = fixed["loss_cls"] * num_fg

    criterion.train()
    first = criterion(cls_logits, box_deltas, ANCHORS, targets)
    ema1 = 0.9 * 100.0 + 0.1 * num_fg
    assert criterion.foreground_ema.item() == pytest.approx(ema1)
    torch.testing.assert_close(first["loss_cls"], raw_cls / ema1, rtol=1e-5, atol=0)
    criterion(cls_logits[:1], box_deltas[:1], ANCHORS, TARGETS[2:])  # no boxes: counts as 1
    ema2 = 0.9 * ema1 + 0.1 * 1.0
    assert criterion.foreground_ema.item() == pytest.approx(ema2)

    criterion.eval()
    evaluated = criterion(cls_logits, box_deltas, ANCHORS, targets)
    assert criterion.foreground_ema.item() == pytest.approx(ema2)
    torch.testing.assert_close(evaluated["loss_cls"], raw_cls / ema2, rtol=1e-5, atol=0)
    assert "foreground_ema" in criterion.state_dict()


def test_gamma_schedule_follows_progress():
    cls_logits, box_deltas = _head_outputs(1)
    scheduled = _criterion(modulation=GammaSchedule(start=0.0, end=2.0))
    for progress, gamma in [(0.0, 0.0), (0.5, 1.0), (1.0, 2.0)]:
        fixed = _criterion(modulation=PowerFactor(gamma))
        got = scheduled(cls_logits, box_deltas, ANCHORS, TARGETS[:1], progress)["loss_cls"]
        want = fixed(cls_logits, box_deltas, ANCHORS, TARGETS[:1])["loss_cls"]
        torch.testing.assert_close(got, want)


def test_alpha_follows_the_gamma_ramp():
    cls_logits, box_deltas = _head_outputs(1)
    ramp = GammaSchedule(start=0.0, end=2.0, ramp_fraction=0.5, alpha_start=0.75)
    scheduled = _criterion(alpha=0.25, modulation=ramp)
    # half-way up the ramp (progress 0.25 of 0.5): gamma 1, alpha 0.5; after it: gamma 2, 0.25
    for progress, gamma, alpha in [(0.0, 0.0, 0.75), (0.25, 1.0, 0.5), (0.8, 2.0, 0.25)]:
        fixed = _criterion(alpha=alpha, modulation=PowerFactor(gamma))
        got = scheduled(cls_logits, box_deltas, ANCHORS, TARGETS[:1], progress)["loss_cls"]
        want = fixed(cls_logits, box_deltas, ANCHORS, TARGETS[:1])["loss_cls"]
        torch.testing.assert_close(got, want)
    # without alpha_start, alpha stays the criterion's
    assert GammaSchedule().alpha_at(0.3, 0.25) == 0.25
    assert GammaSchedule(alpha_start=0.75).alpha_at(0.3, None) is None


def test_invalid_arguments():
    with pytest.raises(ValueError, match="box_loss"):
        _criterion(box_loss="l2")
    with pytest.raises(ValueError, match="normalizer"):
        _criterion(normalizer="mean")
    with pytest.raises(ValueError, match="alpha"):
        _criterion(alpha=1.5)
