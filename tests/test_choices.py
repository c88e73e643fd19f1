import math
import re

import pytest

from retinanet.choices import Interval, check_choice, check_range
from retinanet.model.losses import Modulation


@pytest.mark.parametrize(
    ("interval", "text", "inside", "outside"),
    [
        (Interval(0.0), ">= 0", [0.0, 1e9], [-1e-9]),
        (Interval(0.0, low_open=True), "> 0", [1e-12, 5.0], [0.0, -1.0]),
        (Interval(0.0, 1.0), "in [0, 1]", [0.0, 0.5, 1.0], [-0.1, 1.1]),
        (Interval(0.0, 1.0, True, True), "in (0, 1)", [1e-9, 0.999], [0.0, 1.0]),
        (Interval(0.0, 1.0, high_open=True), "in [0, 1)", [0.0], [1.0]),
        (Interval(0.0, math.pi / 2, low_open=True), "in (0, pi/2]", [math.pi / 2], [0.0, 1.6]),
    ],
)
def test_interval_membership_and_wording(interval, text, inside, outside):
    assert str(interval) == text
    assert all(v in interval for v in inside) and not any(v in interval for v in outside)
    with pytest.raises(ValueError, match=rf"^cos scale must be {re.escape(text)}, got"):
        check_range(outside[0], interval, "cos scale")
    check_range(inside[0], interval, "cos scale")


def test_check_choice_lists_the_options():
    check_choice("cos", Modulation, "loss.modulation")
    with pytest.raises(ValueError, match=r"loss.modulation must be one of \['power', "):
        check_choice("sine", Modulation, "loss.modulation")
