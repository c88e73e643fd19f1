"""`retinanet convert-dataset`: VOC, YOLO and CSV datasets written from a COCO dataset by the
writers below convert back to the same boxes, classes and images; bad input is an error naming
the file and line, or with --skip-invalid a counted, listed skip."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

from retinanet.cli import main as cli
from retinanet.data.coco import CocoDetection, DatasetError
from retinanet.data.formats import read_csv_dataset, read_voc, read_yolo

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]
# file name -> (width, height); b.png has no objects, c.jpg lies in a sub-folder.
IMAGES = {"a.png": (40, 30), "b.png": (50, 64), "sub/c.png": (33, 47)}
# (file name, category id, [x, y, w, h], iscrowd); fractional coordinates on purpose.
ANNOTATIONS = [
    ("a.png", 1, [0.0, 0.0, 12.5, 10.0], 0),
    ("a.png", 3, [20.0, 5.5, 20.0, 24.5], 0),
    ("sub/c.png", 2, [3.0, 4.0, 10.0, 30.0], 0),
    ("sub/c.png", 1, [15.0, 20.0, 8.0, 8.0], 1),
]


@pytest.fixture
def coco_dataset(tmp_path: Path) -> tuple[Path, dict]:
    """An image folder and the COCO dict describing it (the round trips' reference)."""
    image_dir = tmp_path / "images"
    images = []
    for image_id, (name, (width, height)) in enumerate(IMAGES.items(), start=1):
        path = image_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.full((height, width, 3), 60 * image_id, np.uint8))
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    image_id = {image["file_name"]: image["id"] for image in images}
    annotations = [
        {
            "id": i,
            "image_id": image_id[name],
            "category_id": cid,
            "bbox": bbox,
            "area": bbox[2] * bbox[3],
            "iscrowd": crowd,
        }
        for i, (name, cid, bbox, crowd) in enumerate(ANNOTATIONS, start=1)
    ]
    return image_dir, {"images": images, "annotations": annotations, "categories": CATEGORIES}


# ------------------------------------------------------------------------------------------
# Writers of the other formats (the inverse of each converter)
# ------------------------------------------------------------------------------------------


def _objects(coco: dict, image: dict) -> list[dict]:
    return [a for a in coco["annotations"] if a["image_id"] == image["id"]]


def _name(coco: dict, category_id: int) -> str:
    return next(c["name"] for c in coco["categories"] if c["id"] == category_id)


def write_voc(coco: dict, annotation_dir: Path) -> None:
    """One XML per image named by its path with '/' -> '_'; VOC's 1-based inclusive pixels."""
    annotation_dir.mkdir(parents=True)
    for image in coco["images"]:
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = image["file_name"]
        size = ET.SubElement(root, "size")
        ET.SubElement(size, "width").text = str(image["width"])
        ET.SubElement(size, "height").text = str(image["height"])
        for ann in _objects(coco, image):
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = _name(coco, ann["category_id"])
            ET.SubElement(obj, "difficult").text = str(ann["iscrowd"])
            box = ET.SubElement(obj, "bndbox")
            x, y, w, h = ann["bbox"]
            corners = {"xmin": x + 1, "ymin": y + 1, "xmax": x + w, "ymax": y + h}
            for key, value in corners.items():
                ET.SubElement(box, key).text = repr(value)
        stem = Path(image["file_name"]).with_suffix("").as_posix().replace("/", "_")
        ET.indent(root)
        ET.ElementTree(root).write(annotation_dir / f"{stem}.xml")


def write_yolo(coco: dict, label_dir: Path, names_file: Path) -> None:
    """Labels mirroring the image tree, 6 decimals as YOLO tools write; YOLO has no ignore
    regions, so crowd boxes are left out; no label file for an image without objects."""
    ids = [c["id"] for c in coco["categories"]]
    names_file.write_text("".join(f"{c['name']}\n" for c in coco["categories"]))
    for image in coco["images"]:
        lines = []
        for ann in _objects(coco, image):
            if ann["iscrowd"]:
                continue
            x, y, w, h = ann["bbox"]
            W, H = image["width"], image["height"]
            values = ((x + w / 2) / W, (y + h / 2) / H, w / W, h / H)
            index = ids.index(ann["category_id"])
            lines.append(f"{index} " + " ".join(f"{v:.6f}" for v in values) + "\n")
        if lines:
            path = label_dir / Path(image["file_name"]).with_suffix(".txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(lines))


def write_csv(coco: dict, csv_file: Path, classes_file: Path, image_dir: Path) -> None:
    """keras-retinanet's CSV, paths relative to the CSV's folder; crowd boxes left out."""
    classes_file.write_text("".join(f"{c['name']},{c['id']}\n" for c in coco["categories"]))
    rows = []
    for image in coco["images"]:
        path = (image_dir / image["file_name"]).relative_to(csv_file.parent).as_posix()
        objects = [a for a in _objects(coco, image) if not a["iscrowd"]]
        for ann in objects:
            x, y, w, h = ann["bbox"]
            rows.append(f"{path},{x!r},{y!r},{x + w!r},{y + h!r},{_name(coco, ann['category_id'])}")
        if not objects:
            rows.append(f"{path},,,,,")
    csv_file.write_text("\n".join(rows) + "\n")


def _summary(coco: dict, with_crowd: bool = True) -> dict:
    """file name -> (width, height, sorted (class name, bbox, iscrowd)); compared across
    formats, whose image and annotation ids and orders differ."""
    summary = {}
    for image in coco["images"]:
        objects = sorted(
            (_name(coco, a["category_id"]), tuple(a["bbox"]), a.get("iscrowd", 0))
            for a in _objects(coco, image)
            if with_crowd or not a.get("iscrowd", 0)
        )
        summary[image["file_name"]] = (image["width"], image["height"], objects)
    return summary


def _assert_same(converted: dict, reference: dict, with_crowd: bool, atol: float = 1e-9) -> None:
    assert [(c["id"], c["name"]) for c in converted["categories"]] == [
        (c["id"], c["name"]) for c in reference["categories"]
    ]
    got, want = _summary(converted), _summary(reference, with_crowd)
    assert got.keys() == want.keys()
    for name, (width, height, objects) in want.items():
        assert got[name][:2] == (width, height), name
        assert [(n, c) for n, _, c in got[name][2]] == [(n, c) for n, _, c in objects], name
        boxes = np.array([b for _, b, _ in got[name][2]]).reshape(-1, 4)
        expected = np.array([b for _, b, _ in objects]).reshape(-1, 4)
        np.testing.assert_allclose(boxes, expected, rtol=0, atol=atol, err_msg=name)


def _convert(tmp_path: Path, *args: str) -> dict:
    output = tmp_path / "converted.json"
    assert cli(["convert-dataset", *args, "--output", str(output)]) == 0
    return json.loads(output.read_text())


# ------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------


def test_voc_round_trip_keeps_boxes_classes_empty_images_and_difficult(tmp_path, coco_dataset):
    image_dir, reference = coco_dataset
    write_voc(reference, tmp_path / "Annotations")
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\n")
    converted = _convert(
        tmp_path,
        "--from",
        "voc",
        "--images",
        str(image_dir),
        "--annotations",
        str(tmp_path / "Annotations"),
        "--classes",
        str(names),
    )
    _assert_same(converted, reference, with_crowd=True)
    # The difficult object is an ignore region for the loader; b.png stays, without boxes.
    dataset = CocoDetection(image_dir, tmp_path / "converted.json")
    by_name = {i["file_name"]: dataset.image_ids.index(i["id"]) for i in converted["images"]}
    c = dataset.annotations(by_name["sub/c.png"])
    np.testing.assert_allclose(c["crowd_boxes"], [[15, 20, 23, 28]])
    np.testing.assert_allclose(c["boxes"], [[3, 4, 13, 34]])
    assert len(dataset.annotations(by_name["b.png"])["boxes"]) == 0


def test_voc_without_classes_file_sorts_the_names_found(tmp_path, coco_dataset):
    image_dir, reference = coco_dataset
    write_voc(reference, tmp_path / "Annotations")
    converted = read_voc(image_dir, tmp_path / "Annotations")
    assert converted.categories == [(1, "bird"), (2, "cat"), (3, "dog")]


def test_voc_ids_file_selects_the_split(tmp_path, coco_dataset):
    image_dir, reference = coco_dataset
    write_voc(reference, tmp_path / "Annotations")
    ids = tmp_path / "train.txt"
    ids.write_text("sub_c\nb\n")
    converted = read_voc(image_dir, tmp_path / "Annotations", ["cat", "dog", "bird"], ids)
    assert [image.file_name for image in converted.images] == ["sub/c.png", "b.png"]
    ids.write_text("b\nnope\n")
    with pytest.raises(DatasetError, match=r"train\.txt:2: no annotation file .*nope\.xml"):
        read_voc(image_dir, tmp_path / "Annotations", None, ids)


def test_yolo_round_trip_within_its_rounding(tmp_path, coco_dataset):
    image_dir, reference = coco_dataset
    write_yolo(reference, tmp_path / "labels", tmp_path / "names.txt")
    converted = _convert(
        tmp_path,
        "--from",
        "yolo",
        "--images",
        str(image_dir),
        "--labels",
        str(tmp_path / "labels"),
        "--classes",
        str(tmp_path / "names.txt"),
    )
    # 6 decimals of a fraction of at most 64 px: within 64 * 5e-7 px per coordinate.
    _assert_same(converted, reference, with_crowd=False, atol=1e-4)


def test_csv_round_trip_keeps_class_ids_and_empty_images(tmp_path, coco_dataset):
    image_dir, reference = coco_dataset
    reference["categories"] = [
        {"id": 7, "name": "cat"},
        {"id": 0, "name": "dog"},
        {"id": 3, "name": "bird"},
    ]
    remap = {1: 7, 2: 0, 3: 3}
    for ann in reference["annotations"]:
        ann["category_id"] = remap[ann["category_id"]]
    write_csv(reference, tmp_path / "train.csv", tmp_path / "classes.csv", image_dir)
    converted = _convert(
        tmp_path,
        "--from",
        "csv",
        "--annotations",
        str(tmp_path / "train.csv"),
        "--classes",
        str(tmp_path / "classes.csv"),
    )
    # file names are relative to the CSV's folder here (images/...), so compare on those.
    for image in reference["images"]:
        image["file_name"] = f"images/{image['file_name']}"
    _assert_same(converted, reference, with_crowd=False)
    assert [c["id"] for c in converted["categories"]] == [7, 0, 3]
    # and the loader reads it with the CSV's folder as image_dir
    dataset = CocoDetection(tmp_path, tmp_path / "converted.json")
    assert len(dataset) == 3 and dataset.category_ids == [0, 3, 7]


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def _csv(tmp_path: Path, rows: list[str]) -> tuple[Path, Path]:
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((20, 30, 3), np.uint8))
    csv_file, classes = tmp_path / "ann.csv", tmp_path / "classes.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    classes.write_text("cat,0\ndog,1\n")
    return csv_file, classes


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("x.png,1,2,10,12,horse", r"ann\.csv:2: unknown class 'horse'"),
        ("x.png,10,2,10,12,cat", r"ann\.csv:2: box \[10, 2, 10, 12\] has x2 <= x1"),
        ("x.png,1,2,31.5,12,cat", r"ann\.csv:2: box .* outside the 30x20 image"),
        ("x.png,1,2,10,cat", r"ann\.csv:2: expected 'path,x1,y1,x2,y2,class_name', got 5"),
        ("x.png,a,2,10,12,cat", r"ann\.csv:2: box .* is not 4 numbers"),
        ("missing.png,1,2,10,12,cat", r"ann\.csv:2: image .*missing\.png not found"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, row, message):
    csv_file, classes = _csv(tmp_path, ["x.png,1,1,5,5,cat", row])
    with pytest.raises(DatasetError, match=message):
        read_csv_dataset(csv_file, classes)


def test_yolo_errors_name_file_and_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "x.jpg"), np.zeros((20, 40, 3), np.uint8))
    label = tmp_path / "labels" / "x.txt"
    cases = {
        "0 0.9 0.5 0.5 0.2": r"x\.txt:2: box .* outside the 40x20 image",
        "2 0.5 0.5 0.1 0.1": r"x\.txt:2: class index 2 is not in \[0, 2\)",
        "0 0.5 0.5 0.1": r"x\.txt:2: expected 'class cx cy w h'",
        "0 0.5 0.5 0 0.1": r"x\.txt:2: box .* has x2 <= x1",
    }
    for line, message in cases.items():
        label.write_text(f"1 0.5 0.5 0.2 0.2\n{line}\n")
        with pytest.raises(DatasetError, match=message):
            read_yolo(tmp_path / "images", tmp_path / "labels", ["cat", "dog"])
    label.write_text("")
    (tmp_path / "labels" / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=r"orphan\.txt: no image for this label file"):
        read_yolo(tmp_path / "images", tmp_path / "labels", ["cat", "dog"])


def test_voc_errors_name_file_and_line(tmp_path, coco_dataset):
    image_dir, reference = coco_dataset
    write_voc(reference, tmp_path / "Annotations")
    xml = tmp_path / "Annotations" / "a.xml"
    # the error names the line of the <object> tag of the bird, a.xml's second object
    lines = xml.read_text().splitlines()
    bird_line = [i + 1 for i, line in enumerate(lines) if line.strip() == "<object>"][1]
    with pytest.raises(DatasetError, match=rf"a\.xml:{bird_line}: unknown class 'bird'"):
        read_voc(image_dir, tmp_path / "Annotations", ["cat", "dog"])
    (image_dir / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"a\.xml: no image a\.png or a\.<jpg"):
        read_voc(image_dir, tmp_path / "Annotations", ["cat", "dog", "bird"])
    xml.write_text("<annotation><object></annotation>")
    with pytest.raises(DatasetError, match=r"a\.xml:1: malformed XML"):
        read_voc(image_dir, tmp_path / "Annotations", ["cat", "dog", "bird"])


def test_cli_error_is_one_line_naming_the_line(tmp_path, capsys):
    csv_file, classes = _csv(tmp_path, ["x.png,1,1,5,5,cat", "x.png,1,2,10,12,horse"])
    output = tmp_path / "out.json"
    args = ["--from", "csv", "--annotations", str(csv_file), "--classes", str(classes)]
    assert cli(["convert-dataset", *args, "--output", str(output)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "ann.csv:2: unknown class 'horse'" in err
    assert "\n" not in err and not output.exists()
    assert cli(["convert-dataset", "--from", "yolo", "--output", str(output)]) == 1
    assert "--from yolo needs --images and --labels and --classes" in capsys.readouterr().err


def test_skip_invalid_counts_and_lists_what_it_left_out(tmp_path, capsys):
    csv_file, classes = _csv(
        tmp_path,
        [
            "x.png,1,1,5,5,cat",
            "x.png,1,2,10,12,horse",
            "missing.png,1,2,10,12,cat",
            "missing.png,3,3,9,9,dog",
            "x.png,4,4,2,9,dog",
            "empty.png,,,,,",
        ],
    )
    cv2.imwrite(str(tmp_path / "empty.png"), np.zeros((8, 8, 3), np.uint8))
    output = tmp_path / "out.json"
    args = ["--from", "csv", "--annotations", str(csv_file), "--classes", str(classes)]
    assert cli(["convert-dataset", *args, "--output", str(output), "--skip-invalid"]) == 0
    captured = capsys.readouterr()
    assert "skipped 3 invalid records" in captured.err
    for where in ("ann.csv:2: unknown class", "ann.csv:3: image", "ann.csv:5: box"):
        assert where in captured.err
    coco = json.loads(output.read_text())
    assert [i["file_name"] for i in coco["images"]] == ["x.png", "empty.png"]
    assert [a["bbox"] for a in coco["annotations"]] == [[1.0, 1.0, 4.0, 4.0]]
    assert "2 images (1 without objects), 1 boxes + 0 ignore regions" in captured.out
