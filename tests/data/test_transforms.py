import numpy as np
import pytest

from retinanet.data.transforms import DetectionTransform, resized_shape


@pytest.mark.parametrize(
    ("height", "width", "min_size", "max_size", "expected"),
    [
        (480, 640, 800, 1333, (800, 1067)),  # 640 * 800 / 480 = 1066.67
        (800, 1024, 800, 1333, (800, 1024)),  # scale exactly 1
        (100, 1000, 800, 1333, (133, 1333)),  # long side caps: scale = 1333 / 1000
        (640, 427, 800, 1333, (1199, 800)),  # portrait: 640 * 800 / 427 = 1199.06
        (96, 160, 128, 128, (77, 128)),
    ],
)
def test_resized_shape_closed_form(height, width, min_size, max_size, expected):
    assert resized_shape(height, width, min_size, max_size) == expected


def _random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_scale_one_is_bit_identical():
    image = _random_image(800, 1024)
    boxes = np.array([[10.5, 20.25, 300, 400], [0, 0, 1024, 800]], np.float32)
    out, out_boxes, keep = DetectionTransform(800, 1333)(image, boxes)
    assert out.shape == image.shape and np.array_equal(out, image)
    np.testing.assert_allclose(out_boxes, boxes, atol=1e-3)
    assert keep.tolist() == [0, 1]


def test_boxes_scale_with_the_image():
    image = np.zeros((50, 80, 3), np.uint8)
    image[10:30, 20:60] = 255  # a white block whose box is [20, 10, 60, 30]
    boxes = np.array([[20, 10, 60, 30]], np.float32)
    out, out_boxes, _ = DetectionTransform(100, 1000)(image, boxes)
    assert out.shape == (100, 160, 3)
    np.testing.assert_allclose(out_boxes, [[40, 20, 120, 60]], atol=1e-3)
    # the white block moved with its box: fully white inside (1 px margin for interpolation)
    # and black outside
    assert (out[21:59, 41:119] == 255).all()
    assert out[:19].max() == 0 and out[61:].max() == 0
    assert out[:, :39].max() == 0 and out[:, 121:].max() == 0


def test_flip_mirrors_image_and_boxes():
    image = _random_image(40, 60)
    boxes = np.array([[5, 6, 25, 16], [50, 0, 60, 40]], np.float32)
    out, out_boxes, keep = DetectionTransform(40, 1000, flip_prob=1.0)(image, boxes, seed=3)
    assert np.array_equal(out, image[:, ::-1])
    np.testing.assert_allclose(out_boxes, [[35, 6, 55, 16], [0, 0, 10, 40]], atol=1e-3)
    assert keep.tolist() == [0, 1]
    # the deterministic path never flips
    out, out_boxes, _ = DetectionTransform(40, 1000, flip_prob=1.0)(image, boxes, seed=None)
    assert np.array_equal(out, image)


def test_same_seed_same_sample_and_random_ops_are_independent():
    transform = DetectionTransform([32, 48], 1000, flip_prob=0.5, photometric_prob=0.5)
    image = _random_image(40, 60)
    boxes = np.array([[5, 6, 25, 16]], np.float32)
    outcomes = set()
    for seed in range(40):
        first = transform(image, boxes, seed=seed)
        second = transform(image, boxes, seed=seed)
        assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
        height = first[0].shape[0]
        flipped = bool(first[1][0, 0] > 60 * height / 40 / 2)
        plain = DetectionTransform(height, 1000)(image, boxes)[0]
        jittered = not np.array_equal(first[0], plain[:, ::-1] if flipped else plain)
        outcomes.add((height, flipped, jittered))
    # every combination of scale, flip and jitter occurs: the draws are not tied together
    assert {(h, f, j) for h in (32, 48) for f in (False, True) for j in (False, True)} == outcomes


def test_deterministic_path_uses_largest_min_size():
    transform = DetectionTransform([32, 48], 1000, flip_prob=0.5)
    out, _, _ = transform(_random_image(40, 60), np.zeros((0, 4), np.float32), seed=None)
    assert out.shape == (48, 72, 3)


def test_empty_boxes():
    out, out_boxes, keep = DetectionTransform(20, 1000, 0.5, 0.5)(
        _random_image(10, 10), np.zeros((0, 4), np.float32), seed=1
    )
    assert out.shape == (20, 20, 3) and out_boxes.shape == (0, 4) and keep.shape == (0,)
