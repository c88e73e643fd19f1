"""Box encoding and decoding."""

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

from retinanet.model.box_coding import DEFAULT_SCALE_CLAMP, BoxCoder


def test_encode_hand_computed():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = torch.tensor([[5.0, 5.0, 25.0, 15.0]])  # centre (15, 10), size 20 x 10
    deltas = BoxCoder().encode(anchors, boxes)
    torch.testing.assert_close(deltas, torch.tensor([[1.0, 0.5, math.log(2.0), 0.0]]))
    weighted = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).encode(anchors, boxes)
    torch.testing.assert_close(weighted, torch.tensor([[10.0, 5.0, 5 * math.log(2.0), 0.0]]))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_round_trip_and_torchvision_agreement(weights):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g, dtype=torch.float64) * 500
    anchors = torch.cat([xy, xy + 4 + torch.rand(500, 2, generator=g) * 300], dim=1)
    xy = torch.rand(500, 2, generator=g, dtype=torch.float64) * 500
    boxes = torch.cat([xy, xy + 1 + torch.rand(500, 2, generator=g) * 300], dim=1)
    coder = BoxCoder(weights)
    deltas = coder.encode(anchors, boxes)
    torch.testing.assert_close(coder.decode(deltas, anchors), boxes, rtol=1e-9, atol=1e-9)
    reference = TorchvisionBoxCoder(weights)
    torch.testing.assert_close(deltas, reference.encode_single(boxes, anchors))
    torch.testing.assert_close(
        coder.decode(deltas, anchors), reference.decode_single(deltas, anchors)
    )


def test_decode_clamps_growth():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 8.0]])
    deltas = torch.tensor([[0.0, 0.0, 100.0, -3.0]])
    box = BoxCoder().decode(deltas, anchors)[0]
    # exp(dw) is clamped to 1000 / 16: the width becomes 1000; dh is not clamped below.
    assert (box[2] - box[0]).item() == pytest.approx(1000.0, rel=1e-5)
    assert (box[3] - box[1]).item() == pytest.approx(8.0 * math.exp(-3.0), rel=1e-5)
    assert (box[0] + box[2]).item() / 2 == pytest.approx(8.0)
    assert DEFAULT_SCALE_CLAMP == pytest.approx(math.log(1000.0 / 16))


def test_decode_keeps_the_deltas_dtype_and_broadcasts():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0]])
    deltas = torch.zeros(3, 2, 4, dtype=torch.float16)
    boxes = BoxCoder().decode(deltas, anchors)
    assert boxes.dtype == torch.float16 and boxes.shape == (3, 2, 4)
    torch.testing.assert_close(boxes.float(), anchors.expand(3, 2, 4))
