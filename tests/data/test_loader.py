import itertools
import json

import pytest
import torch

from retinanet.data.coco import CocoDetection, DatasetError
from retinanet.data.collate import raise_on_bad_images
from retinanet.data.loader import create_test_loader, create_train_loader
from retinanet.data.transforms import DetectionTransform

# portrait and landscape images, one box each
SIZES = {i: ((20, 30) if i % 3 else (30, 20)) for i in range(1, 10)}


@pytest.fixture
def dataset(write_coco) -> CocoDetection:
    anns = [
        {"id": i, "image_id": i, "category_id": 7, "bbox": [1, 2, 5, 6], "iscrowd": 0}
        for i in SIZES
    ]
    transform = DetectionTransform([20, 24], 100, flip_prob=0.5, photometric_prob=0.5)
    return CocoDetection(*write_coco(SIZES, anns), transform=transform)


def _batches(loader, n):
    return list(itertools.islice(iter(loader), n))


def _same(a, b):
    return (
        a.image_ids == b.image_ids
        and torch.equal(a.images, b.images)
        and all(
            torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a.targets, b.targets, strict=True)
        )
    )


def test_train_loader_resumes_exactly_and_groups_orientations(dataset):
    def loader(start_iter):
        return create_train_loader(
            dataset,
            batch_size=2,
            num_workers=0,
            seed=4,
            start_iter=start_iter,
            size_divisibility=32,
            pin_memory=False,
        )

    full = _batches(loader(0), 8)
    for batch in full:
        assert batch.images.shape[0] == 2 and batch.images.shape[-1] % 32 == 0
        heights, widths = batch.image_sizes.T
        landscape = (widths >= heights).tolist()
        assert landscape[0] == landscape[1]
    resumed = _batches(loader(5), 3)
    assert all(_same(a, b) for a, b in zip(resumed, full[5:], strict=True))


def test_worker_gives_the_same_batches_as_the_main_process(dataset):
    def batches(num_workers):
        loader = create_train_loader(
            dataset,
            batch_size=3,
            num_workers=num_workers,
            seed=9,
            aspect_ratio_grouping=False,
            pin_memory=False,
        )
        return _batches(loader, 3)

    assert all(_same(a, b) for a, b in zip(batches(0), batches(1), strict=True))


def _with_garbage_image(write_coco):
    image_dir, annotation_file = write_coco({1: (10, 10), 3: (10, 10)}, [])
    data = json.loads(annotation_file.read_text())
    data["images"].append({"id": 2, "file_name": "garbage.jpg", "width": 10, "height": 10})
    annotation_file.write_text(json.dumps(data))
    (image_dir / "garbage.jpg").write_bytes(bytes(range(256)) * 4)
    return image_dir, annotation_file


def test_corrupt_image_crosses_the_worker_boundary_as_one_clean_line(write_coco):
    image_dir, annotation_file = _with_garbage_image(write_coco)
    dataset = CocoDetection(image_dir, annotation_file)
    with pytest.raises(DatasetError, match=r"garbage\.jpg \(image id 2\)"):
        dataset[1]  # read directly, the error is raised
    loader = create_test_loader(dataset, batch_size=2, num_workers=1)
    batches = list(loader)
    assert batches[0].bad_images and not batches[1].bad_images
    with pytest.raises(DatasetError) as caught:
        raise_on_bad_images(batches[0], "fix it")
    message = str(caught.value)
    assert message.startswith("cannot decode image ") and "garbage.jpg (image id 2)" in message
    assert message.endswith("; fix it") and "Traceback" not in message and "\n" not in message


def test_skip_replaces_a_corrupt_image_deterministically(write_coco):
    image_dir, annotation_file = _with_garbage_image(write_coco)
    dataset = CocoDetection(image_dir, annotation_file, on_bad_image="skip")
    item = dataset[1]  # garbage.jpg: replaced by the next image in index order
    assert item["image_id"] == 3 and "garbage.jpg" in item["skipped_images"][0]
    assert dataset[1]["image_id"] == 3
    loader = create_test_loader(dataset, batch_size=3, num_workers=1)
    (batch,) = list(loader)
    assert batch.image_ids == [1, 3, 3] and len(batch.skipped_images) == 1


def test_test_loader_sees_every_image_once_across_ranks(dataset):
    seen = []
    for rank in range(2):
        loader = create_test_loader(dataset, batch_size=2, rank=rank, world_size=2)
        for batch in loader:
            seen += batch.image_ids
            # deterministic transform: short side = the largest min_size
            assert batch.image_sizes.min(dim=1).values.tolist() == [24] * len(batch.image_ids)
    assert seen == dataset.image_ids
