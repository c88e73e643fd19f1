"""The README's "Your own data" walkthrough, run command by command as written there on a small
VOC dataset this test writes: convert both splits, check the anchors, train (made tiny by extra
overrides appended to the README's), evaluate and find the pictures."""

import json
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np

from retinanet.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("red", "blue")
COLOURS = {"red": (40, 40, 230), "blue": (230, 60, 40)}  # BGR

# Appended to the README's training command: a ResNet-10 with 32 channels on 64 px images for
# two iterations, trained from scratch (no ImageNet download), so that the test takes seconds.
TINY_TRAINING = [
    "model.backbone.depth=18",
    "model.backbone.blocks=[1,1,1,1]",
    "model.backbone.weights=",
    "model.backbone.norm=bn",
    "model.backbone.freeze_at=0",
    "model.fpn.channels=32",
    "input.min_size=[64]",
    "input.max_size=64",
    "input.test_min_size=64",
    "input.test_max_size=64",
    "input.size_divisibility=32",
    "train.batch_size=2",
    "train.max_iter=2",
    "train.warmup_iters=1",
    "train.lr_steps=[]",
    "train.eval_period=1",
    "train.checkpoint_period=2",
    "train.log_period=1",
    "precision.amp=",
    "precision.channels_last=false",
    "data.num_workers=0",
    "eval.batch_size=4",
]


def readme_commands() -> list[list[str]]:
    """The `retinanet ...` commands of the README section, continuation lines joined."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Your own data\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("retinanet "):
                commands.append(shlex.split(line)[1:])
    return commands


def write_voc_dataset(root: Path) -> dict[str, int]:
    """my_data/ in VOC layout: 12 images of 64 x 48 px with 0-2 coloured rectangles (one
    difficult), split 8 / 4 by ImageSets/Main/{train,val}.txt; returns GT boxes per val class."""
    rng = np.random.default_rng(0)
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    ids = [f"{i:06d}" for i in range(12)]
    val_counts = dict.fromkeys(CLASSES, 0)
    for n, image_id in enumerate(ids):
        image = np.full((48, 64, 3), 128, np.uint8)
        xml = ET.Element("annotation")
        ET.SubElement(xml, "filename").text = f"{image_id}.jpg"
        for k in range(0 if n == 3 else 1 + n % 2):  # image 3 has no objects
            name = CLASSES[(n + k) % 2]
            w, h = rng.integers(12, 28, size=2)
            x1, y1 = rng.integers(0, 64 - w), rng.integers(0, 48 - h)
            cv2.rectangle(image, (int(x1), int(y1)), (int(x1 + w), int(y1 + h)), COLOURS[name], -1)
            obj = ET.SubElement(xml, "object")
            ET.SubElement(obj, "name").text = name
            ET.SubElement(obj, "difficult").text = "1" if n == 5 and k == 1 else "0"
            box = ET.SubElement(obj, "bndbox")
            corners = (x1 + 1, y1 + 1, x1 + w, y1 + h)
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), corners, strict=True):
                ET.SubElement(box, key).text = str(int(value))
            if n >= 8:
                val_counts[name] += 1
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), image)
        ET.ElementTree(xml).write(root / "Annotations" / f"{image_id}.xml")
    (root / "ImageSets/Main/train.txt").write_text("".join(f"{i}\n" for i in ids[:8]))
    (root / "ImageSets/Main/val.txt").write_text("".join(f"{i}\n" for i in ids[8:]))
    return val_counts


def test_readme_walkthrough_on_a_small_voc_dataset(tmp_path, monkeypatch, capsys):
    commands = readme_commands()
    assert [c[0] for c in commands] == [
        "convert-dataset",
        "convert-dataset",
        "analyze-anchors",
        "train",
        "eval",
    ]
    monkeypatch.chdir(tmp_path)
    val_counts = write_voc_dataset(tmp_path / "my_data")
    for command in commands:
        # The README's config paths are relative to the repository.
        command = [str(REPO / a) if a.startswith("configs/") else a for a in command]
        if command[0] == "train":
            command += TINY_TRAINING
        if command[0] == "eval":
            command += ["--device", "cpu"]
        assert cli(command) == 0, f"README command failed: retinanet {shlex.join(command)}"

    train = json.loads((tmp_path / "my_data/train.json").read_text())
    val = json.loads((tmp_path / "my_data/val.json").read_text())
    assert (len(train["images"]), len(val["images"])) == (8, 4)
    assert [c["name"] for c in train["categories"]] == list(CLASSES)
    assert sum(a["iscrowd"] for a in train["annotations"]) == 1  # the difficult object
    coverage = json.loads((tmp_path / "runs/my_data/anchors/anchor_coverage.json").read_text())
    assert coverage["num_images"] == 8
    assert coverage["num_boxes"] == sum(1 - a["iscrowd"] for a in train["annotations"])
    assert (tmp_path / "runs/my_data/model_final.pth").is_file()
    # train.eval_period keeps the best evaluated model beside the final one.
    assert (tmp_path / "runs/my_data/model_best.pth").is_file()
    assert "iteration" in json.loads((tmp_path / "runs/my_data/best_metrics.json").read_text())
    eval_dir = tmp_path / "runs/my_data/eval"
    for name in ("metrics.json", "pr_curves.png", "confusion_matrix.csv", "confusion_matrix.png"):
        assert (eval_dir / name).is_file(), name
    # every validation box appears once in its class's row of the confusion matrix
    rows = (eval_dir / "confusion_matrix.csv").read_text().splitlines()
    per_class = {row.split(",")[0]: sum(map(int, row.split(",")[1:])) for row in rows[1:]}
    assert {c: per_class[c] for c in CLASSES} == val_counts
    assert "AP " in capsys.readouterr().out
