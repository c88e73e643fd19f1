"""Entropy of sigmoid class scores: closed form, extreme logits, and the per-anchor tally."""

import math

import pytest
import torch

from retinanet.analysis.entropy import EntropyTally, binary_entropy
from retinanet.model.matcher import BACKGROUND, IGNORE


def test_binary_entropy_closed_form_and_extremes():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64)
    p = torch.sigmoid(x)
    expected = -(p * p.log() + (1 - p) * (1 - p).log())
    torch.testing.assert_close(binary_entropy(x), expected)
    assert binary_entropy(torch.zeros(1))[0].item() == pytest.approx(math.log(2))
    extreme = binary_entropy(torch.tensor([-200.0, 200.0], dtype=torch.bfloat16))
    assert extreme.dtype == torch.float32 and torch.isfinite(extreme).all()
    assert extreme.max().item() < 1e-30


def test_tally_averages_over_classes_then_anchors_by_label():
    # One image, four anchors, two classes: a foreground anchor with logits (0, 0) (entropy
    # ln 2 for both classes), two background ones, one with (0, 0) and one in the padding,
    # and an ignored one. Background mean: (ln 2 + H(sigmoid(4)) ...) of the counted anchors.
    logits = torch.tensor([[[0.0, 0.0], [0.0, 4.0], [9.0, 9.0], [0.0, 0.0]]])
    classes = torch.tensor([[1, BACKGROUND, BACKGROUND, IGNORE]])
    padding = torch.tensor([[False, False, True, False]])
    tally = EntropyTally()
    tally.add(logits, classes, padding)
    h4 = binary_entropy(torch.tensor(4.0)).item()
    means = tally.means()
    assert means["foreground"] == pytest.approx(math.log(2))
    assert means["background"] == pytest.approx((math.log(2) + h4) / 2)
    assert (means["num_foreground"], means["num_background"]) == (1, 1)
    assert EntropyTally().means()["foreground"] is None
