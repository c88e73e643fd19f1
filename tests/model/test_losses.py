"""Focal loss (reference and fused), modulating factors, gamma schedules and box losses."""

import math

import pytest
import torch
import torchvision

from retinanet.model.losses import (
    CosineFactor,
    ExponentialFactor,
    GammaSchedule,
    GaussianFactor,
    PowerFactor,
    SampleDependentPowerFactor,
    dense_focal_loss,
    giou_loss,
    resolve_factor,
    sigmoid_focal_loss,
    smooth_l1_loss,
)
from retinanet.model.matcher import BACKGROUND, IGNORE

FACTORS = [0.0, 0.5, 1.0, 2.0, 3.0, ExponentialFactor(1.0), ExponentialFactor(3.0), CosineFactor(),
           CosineFactor(1.0), GaussianFactor(0.3), SampleDependentPowerFactor()]  # fmt: skip


def _closed_form(x: float, t: int, alpha: float | None, gamma: float) -> float:
    """Eq. 5 of the paper written out with the math module."""
    p = 1.0 / (1.0 + math.exp(-x))
    p_t = p if t == 1 else 1.0 - p
    alpha_t = 1.0 if alpha is None else (alpha if t == 1 else 1.0 - alpha)
    return -alpha_t * (1.0 - p_t) ** gamma * math.log(p_t)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("alpha", [0.25, None])
def test_focal_loss_matches_closed_form(gamma, alpha):
    cases = [(0.3, 1), (-1.2, 1), (2.5, 0), (-0.7, 0), (0.0, 1), (6.0, 1), (-6.0, 0)]
    logits = torch.tensor([x for x, _ in cases], dtype=torch.float64)
    targets = torch.tensor([t for _, t in cases], dtype=torch.float64)
    loss = sigmoid_focal_loss(logits, targets, alpha, gamma)
    expected = [_closed_form(x, t, alpha, gamma) for x, t in cases]
    assert loss.dtype == torch.float64
    torch.testing.assert_close(
        loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("alpha", [0.25, None])
def test_focal_loss_matches_torchvision_values_and_gradients(gamma, alpha):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(200, 5, generator=g, dtype=torch.float64)).requires_grad_()
    targets = (torch.rand(200, 5, generator=g) < 0.2).to(torch.float64)
    ours = sigmoid_focal_loss(logits, targets, alpha, gamma, reduction="sum")
    (ours_grad,) = torch.autograd.grad(ours, logits)
    # torchvision disables alpha-balancing with a negative alpha.
    ref_alpha = -1.0 if alpha is None else alpha
    ref = torchvision.ops.sigmoid_focal_loss(logits, targets, ref_alpha, gamma, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_focal_loss_extreme_logits_are_finite(dtype, gamma):
    # Well classified (+-100 on the right side) and badly misclassified (on the wrong side).
    logits = torch.tensor([100.0, -100.0, 100.0, -100.0], dtype=dtype, requires_grad=True)
    targets = torch.tensor([1.0, 1.0, 0.0, 0.0])
    loss = sigmoid_focal_loss(logits, targets, 0.25, gamma)
    loss.sum().backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    # -log p_t = 100 for the misclassified elements and (1 - p_t)^gamma = 1; the gradient
    # there tends to -alpha_t (positive) and +alpha_t (negative).
    torch.testing.assert_close(loss, torch.tensor([0.0, 25.0, 75.0, 0.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        logits.grad.float(), torch.tensor([0.0, -0.25, 0.75, 0.0]), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("factor", FACTORS)
def test_dense_focal_loss_extreme_logits_are_finite(dtype, factor):
    logits = torch.tensor(
        [[100.0, -100.0], [-100.0, 100.0], [-100.0, -100.0], [100.0, 100.0]], dtype=dtype
    ).requires_grad_()
    classes = torch.tensor([0, 0, BACKGROUND, 1])
    loss = dense_focal_loss(logits, classes, 0.25, factor)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == dtype
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    expected = sigmoid_focal_loss(logits.detach().float(), _one_hot(classes, 2), 0.25, factor)
    torch.testing.assert_close(loss, expected.sum(), rtol=1e-5, atol=1e-5)


def test_autocast_bf16_computes_the_loss_in_fp32():
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(8, 3)
    features = torch.randn(2, 40, 8, generator=g)
    classes = torch.randint(-2, 3, (2, 40), generator=g)
    targets = _one_hot(classes, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(features)
        reference = sigmoid_focal_loss(logits, targets, reduction="sum")
        dense = dense_focal_loss(logits, classes)
    assert logits.dtype == torch.bfloat16
    assert reference.dtype == torch.float32 and dense.dtype == torch.float32
    # The same bf16 logits upcast by hand, outside autocast: identical fp32 arithmetic.
    upcast = logits.detach().float()
    assert torch.equal(reference, sigmoid_focal_loss(upcast, targets, reduction="sum"))
    assert torch.equal(dense, dense_focal_loss(upcast, classes))
    dense.backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


def _one_hot(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Targets of the reference loss: 1 at (anchor, class) of foreground anchors."""
    targets = torch.zeros(*classes.shape, num_classes)
    fg = classes >= 0
    targets[fg, classes[fg]] = 1.0
    return targets


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("alpha", [0.25, None, 1.0, 0.0])
def test_dense_focal_loss_equals_reference_over_non_ignored_anchors(factor, alpha):
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(2, 300, 6, generator=g)).requires_grad_()
    choice = torch.rand(2, 300, generator=g)
    classes = torch.where(choice < 0.6, BACKGROUND, torch.randint(0, 6, (2, 300), generator=g))
    classes = torch.where(choice > 0.85, IGNORE, classes)

    dense = dense_focal_loss(logits, classes, alpha, factor)
    (0.7 * dense).backward()  # a non-unit upstream gradient
    dense_grad = logits.grad.clone()

    logits.grad = None
    per_element = sigmoid_focal_loss(logits, _one_hot(classes, 6), alpha, factor)
    reference = per_element[classes != IGNORE].sum()
    (0.7 * reference).backward()

    torch.testing.assert_close(dense, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense_grad, logits.grad, rtol=1e-5, atol=1e-6)
    assert (dense_grad[classes == IGNORE] == 0).all()


def test_dense_focal_loss_all_ignored_is_zero():
    logits = torch.randn(1, 10, 3, requires_grad=True)
    loss = dense_focal_loss(logits, torch.full((1, 10), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


def test_dense_focal_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(2, 10, 3\).*\(2, 9\)"):
        dense_focal_loss(torch.zeros(2, 10, 3), torch.zeros(2, 9, dtype=torch.int64))


def test_modulating_factors_closed_form():
    p = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    torch.testing.assert_close(PowerFactor(2.0)(p), (1 - p) ** 2)
    torch.testing.assert_close(PowerFactor(0.5)(p), (1 - p) ** 0.5)
    torch.testing.assert_close(PowerFactor(0.0)(p), torch.ones(5))
    torch.testing.assert_close(ExponentialFactor(2.0)(p), torch.exp(-2.0 * p))


def _factor_closed_form(factor, p):
    """f(p_t) written out from each factor's definition."""
    if isinstance(factor, PowerFactor):
        return (1 - p) ** factor.gamma
    if isinstance(factor, ExponentialFactor):
        return torch.exp(-factor.beta * p)
    if isinstance(factor, CosineFactor):
        return torch.cos(factor.scale * p)
    if isinstance(factor, GaussianFactor):
        return torch.exp(-(p**2) / factor.s)
    gamma = torch.where(p.detach() < 0.2, 5.0, 3.0).double()  # FLSD-53
    return (1 - p) ** gamma


@pytest.mark.parametrize(
    "factor",
    [PowerFactor(0.5), PowerFactor(2.0), ExponentialFactor(1.5), CosineFactor(), CosineFactor(1.0),
     GaussianFactor(0.2), SampleDependentPowerFactor()],
)  # fmt: skip
def test_factor_derivative_term(factor):
    # weights(z)[1] must be h(p_t) = -p_t (1 - p_t) f'(p_t); f' by autograd on p_t.
    z = torch.linspace(-8, 8, 33, dtype=torch.float64)
    p = torch.sigmoid(z).requires_grad_()
    f = _factor_closed_form(factor, p)
    (df,) = torch.autograd.grad(f.sum(), p)
    f_ours, h_ours = factor.weights(z)
    torch.testing.assert_close(f_ours, f.detach())
    torch.testing.assert_close(h_ours, -p.detach() * (1 - p.detach()) * df)


def test_new_factors_values_and_limits():
    p = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    torch.testing.assert_close(CosineFactor()(p), torch.cos(math.pi / 2 * p))
    assert CosineFactor()(torch.tensor([1.0]))[0] == pytest.approx(0.0, abs=1e-12)
    assert CosineFactor(1.0)(torch.tensor([1.0]))[0] == pytest.approx(math.cos(1.0))
    torch.testing.assert_close(GaussianFactor(0.5)(p), torch.exp(-(p**2) / 0.5))
    # FLSD-53: gamma 5 just below p_t = 0.2, gamma 3 just above.
    flsd = SampleDependentPowerFactor()(torch.tensor([0.19, 0.21], dtype=torch.float64))
    torch.testing.assert_close(flsd, torch.tensor([0.81**5, 0.79**3], dtype=torch.float64))
    with pytest.raises(ValueError, match="pi/2"):
        CosineFactor(2.0)
    with pytest.raises(ValueError, match="> 0"):
        GaussianFactor(0.0)


@pytest.mark.parametrize("alpha", [0.25, None])
def test_label_smoothing_equals_cross_entropy_with_smoothed_targets(alpha):
    """Targets 1 - eps/2 (true class) and eps/2 (others), alpha by the hard label: the dense
    loss and its gradient equal binary cross-entropy with those soft targets."""
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(2, 200, 5, generator=g)).requires_grad_()
    choice = torch.rand(2, 200, generator=g)
    classes = torch.where(choice < 0.6, BACKGROUND, torch.randint(0, 5, (2, 200), generator=g))
    classes = torch.where(choice > 0.85, IGNORE, classes)
    eps = 0.1
    dense = dense_focal_loss(logits, classes, alpha, 0.0, label_smoothing=eps)
    dense.backward()
    dense_grad = logits.grad.clone()

    logits.grad = None
    hard = _one_hot(classes, 5).float()
    soft = hard * (1 - eps) + eps / 2
    weight = torch.ones_like(hard) if alpha is None else alpha * hard + (1 - alpha) * (1 - hard)
    kept = (classes != IGNORE).unsqueeze(-1).float()
    reference = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, soft, weight=weight * kept, reduction="sum"
    )
    reference.backward()
    torch.testing.assert_close(dense, reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dense_grad, logits.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cross-entropy only"):
        dense_focal_loss(logits, classes, alpha, 2.0, label_smoothing=eps)


def test_power_factor_rejects_negative_gamma():
    with pytest.raises(ValueError, match="gamma"):
        PowerFactor(-1.0)


def test_gamma_schedule_linear():
    schedule = GammaSchedule(start=0.0, end=2.0, ramp_fraction=0.5, shape="linear")
    progress = [-0.1, 0.0, 0.125, 0.25, 0.5, 0.9, 1.0]
    assert [schedule.gamma_at(p) for p in progress] == pytest.approx([0, 0, 0.5, 1, 2, 2, 2])
    factor = resolve_factor(schedule, 0.25)
    assert isinstance(factor, PowerFactor) and factor.gamma == pytest.approx(1.0)


def test_gamma_schedule_cosine():
    schedule = GammaSchedule(start=1.0, end=3.0, ramp_fraction=1.0, shape="cosine")
    # gamma = start + (end - start) (1 - cos(pi t)) / 2
    expected = [1.0, 1.0 + (1 - math.cos(math.pi / 4)), 2.0, 3.0 - (1 - math.cos(math.pi / 4)), 3.0]
    got = [schedule.gamma_at(p) for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert got == pytest.approx(expected)
    decreasing = GammaSchedule(start=2.0, end=0.0)
    assert decreasing.gamma_at(0.75) == pytest.approx(0.5)
    # alpha rides the same half cosine: 0.75 -> 0.25 is half-way where gamma is
    with_alpha = GammaSchedule(start=0.0, end=2.0, shape="cosine", alpha_start=0.75)
    for p in (0.0, 0.25, 0.5, 0.75, 1.0):
        along = with_alpha.gamma_at(p) / 2.0
        assert with_alpha.alpha_at(p, 0.25) == pytest.approx(0.75 - 0.5 * along)


def test_gamma_schedule_validation_and_fixed_factors():
    with pytest.raises(ValueError, match="shape"):
        GammaSchedule(shape="step")
    with pytest.raises(ValueError, match="ramp_fraction"):
        GammaSchedule(ramp_fraction=0.0)
    with pytest.raises(ValueError, match="gamma schedule start must be >= 0"):
        GammaSchedule(start=-1.0)
    with pytest.raises(ValueError, match="alpha_start"):
        GammaSchedule(alpha_start=1.5)
    fixed = ExponentialFactor(1.0)
    assert resolve_factor(fixed, 0.3) is fixed


def test_smooth_l1_closed_form_and_beta_zero_is_l1():
    deltas = torch.tensor([[0.05, -0.2, 1.0, 0.0]])
    targets = torch.zeros(1, 4)
    # |d| < beta: 0.5 d^2 / beta; otherwise |d| - beta / 2.
    expected = 0.5 * 0.05**2 / 0.11 + (0.2 - 0.055) + (1.0 - 0.055)
    assert smooth_l1_loss(deltas, targets, beta=0.11).item() == pytest.approx(expected, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g)
    torch.testing.assert_close(smooth_l1_loss(a, b, beta=0.0), (a - b).abs().sum())


def test_giou_loss_matches_torchvision_per_box_and_in_total():
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(100, 2, 2, generator=g) * 50
    boxes = torch.cat([corners[:, 0], corners[:, 0] + 1 + 20 * torch.rand(100, 2, generator=g)], 1)
    targets = torch.cat(
        [corners[:, 1], corners[:, 1] + 1 + 20 * torch.rand(100, 2, generator=g)], 1
    )
    expected = torchvision.ops.generalized_box_iou_loss(boxes, targets, reduction="none")
    torch.testing.assert_close(giou_loss(boxes, targets, reduction="none"), expected)
    per_box = giou_loss(boxes.bfloat16(), targets, reduction="none")
    assert per_box.shape == (100,) and per_box.dtype == torch.float32
    assert bool(((per_box >= 0) & (per_box <= 2)).all())
    torch.testing.assert_close(per_box.sum(), giou_loss(boxes.bfloat16(), targets))


def test_giou_loss_hand_computed():
    # Identical boxes: GIoU 1. Disjoint unit squares one apart: IoU 0, hull 3, union 2,
    # GIoU = -1/3, loss 4/3.
    boxes = torch.tensor([[0.0, 0.0, 4.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    targets = torch.tensor([[0.0, 0.0, 4.0, 2.0], [2.0, 0.0, 3.0, 1.0]])
    assert giou_loss(boxes, targets).item() == pytest.approx(4 / 3, rel=1e-6)
