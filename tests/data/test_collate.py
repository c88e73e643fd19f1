import pytest
import torch

from retinanet.data.collate import Batch, collate_detection


def _sample(height, width, num_boxes, image_id, fill):
    return {
        "image": torch.full((3, height, width), fill, dtype=torch.uint8),
        "boxes": torch.arange(num_boxes * 4, dtype=torch.float32).reshape(num_boxes, 4),
        "labels": torch.arange(num_boxes, dtype=torch.int64),
        "crowd_boxes": torch.zeros((0, 4)),
        "image_id": image_id,
        "orig_size": (2 * height, 2 * width),
        "size": (height, width),
    }


@pytest.mark.parametrize(
    ("divisibility", "padded"), [(128, (128, 256)), (32, (128, 224)), (1, (100, 200))]
)
def test_padding_to_multiples(divisibility, padded):
    samples = [_sample(100, 130, 2, 11, 7), _sample(64, 200, 0, 12, 9)]
    batch = collate_detection(samples, size_divisibility=divisibility)
    assert batch.images.shape == (2, 3, *padded) and batch.images.dtype == torch.uint8
    assert batch.image_sizes.tolist() == [[100, 130], [64, 200]]
    assert batch.image_sizes.dtype == torch.int64
    # pixels kept at the top left, zeros at the bottom and right
    assert (batch.images[0, :, :100, :130] == 7).all()
    assert batch.images[0].sum() == 7 * 3 * 100 * 130
    assert (batch.images[1, :, :64, :200] == 9).all()
    assert batch.images[1].sum() == 9 * 3 * 64 * 200
    assert batch.image_ids == [11, 12]
    assert batch.orig_sizes == [(200, 260), (128, 400)]
    assert batch.targets[0]["boxes"] is samples[0]["boxes"]
    assert batch.targets[1]["labels"].shape == (0,)


def test_default_divisibility_is_p7_stride():
    batch = collate_detection([_sample(129, 1, 0, 1, 1)])
    assert batch.images.shape[-2:] == (256, 128)


def test_to_moves_every_tensor():
    batch = collate_detection([_sample(10, 10, 1, 1, 1)]).to("meta")
    assert isinstance(batch, Batch)
    assert batch.images.device.type == "meta" and batch.image_sizes.device.type == "meta"
    assert all(t.device.type == "meta" for t in batch.targets[0].values())
    assert batch.image_ids == [1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_pin_memory():
    batch = collate_detection([_sample(10, 10, 1, 1, 1)]).pin_memory()
    assert batch.images.is_pinned() and batch.targets[0]["boxes"].is_pinned()
