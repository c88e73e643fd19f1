r"""Convert a VOC, YOLO or CSV dataset to a COCO instances JSON that training and evaluation read.

    retinanet convert-dataset --from voc --images VOC2012/JPEGImages \
        --annotations VOC2012/Annotations --ids VOC2012/ImageSets/Main/train.txt \
        [--classes names.txt] --output voc_train.json
    retinanet convert-dataset --from yolo --images data/images/train \
        --labels data/labels/train --classes names.txt --output train.json
    retinanet convert-dataset --from csv --annotations train.csv --classes classes.csv \
        --output train.json

Every image is kept, also those without objects. VOC `difficult` objects become ignore regions
(`iscrowd=1`). Bad input (a missing image, a box outside its image or with x2 <= x1, an unknown
class, a malformed line) stops the conversion with the file and line at fault; with
--skip-invalid the bad records are left out, counted and listed instead. The output's file names
are relative to the image folder, which is printed as `data.<split>.image_dir` to train with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from retinanet.data.formats import (
    ConvertedDataset,
    read_csv_dataset,
    read_names,
    read_voc,
    read_yolo,
    write_coco,
)
from retinanet.files import atomic_write_text

FORMATS = ("voc", "yolo", "csv")
_LISTED_SKIPS = 20  # skipped records printed; all of them go to <output>.skipped.txt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", choices=FORMATS, required=True)
    # Which of these inputs a format needs is checked in `convert` (all default to None).
    parser.add_argument(
        "--images", help="image folder (csv: base of relative paths, default its folder)"
    )
    parser.add_argument("--annotations", help="voc: XML folder; csv: the CSV file")
    parser.add_argument("--labels", help="yolo: folder of .txt label files")
    parser.add_argument(
        "--classes",
        help="voc/yolo: names, one per line (ids 1..K in order); csv: 'class_name,id' rows",
    )
    parser.add_argument("--ids", help="voc: split list (ImageSets/Main/train.txt)")
    parser.add_argument("--output", required=True, help="COCO instances JSON to write")
    parser.add_argument(
        "--skip-invalid", action="store_true", help="leave out and list bad records, don't stop"
    )


def run(args: argparse.Namespace) -> int:
    dataset, image_root = convert(args)
    if not dataset.images:
        skipped = f" ({len(dataset.skipped)} skipped as invalid)" if dataset.skipped else ""
        raise ValueError(f"no image to convert{skipped}; check --images and the annotations")
    output = Path(args.output)
    coco = write_coco(output, dataset)
    num_empty = sum(1 for image in dataset.images if len(image.boxes) == 0)
    num_crowd = sum(a["iscrowd"] for a in coco["annotations"])
    print(
        f"{output}: {len(coco['images'])} images ({num_empty} without objects), "
        f"{len(coco['annotations']) - num_crowd} boxes + {num_crowd} ignore regions, "
        f"{len(coco['categories'])} classes"
    )
    if dataset.skipped:
        _list_skipped(dataset.skipped, output)
    print(
        f"train or evaluate with data.<split>.image_dir={image_root} "
        f"data.<split>.annotation_file={output}"
    )
    return 0


def convert(args: argparse.Namespace) -> tuple[ConvertedDataset, Path]:
    """The converted dataset and the folder its file names are relative to."""
    skip = args.skip_invalid
    if args.source == "voc":
        _require(args, "images", "annotations")
        classes = read_names(args.classes) if args.classes else None
        dataset = read_voc(args.images, args.annotations, classes, args.ids, skip_invalid=skip)
        return dataset, Path(args.images)
    if args.ids:
        raise ValueError("--ids is for --from voc only")
    if args.source == "yolo":
        _require(args, "images", "labels", "classes")
        dataset = read_yolo(
            args.images, args.labels, read_names(args.classes), skip, ignore=[args.classes]
        )
        return dataset, Path(args.images)
    _require(args, "annotations", "classes")
    dataset = read_csv_dataset(args.annotations, args.classes, args.images, skip_invalid=skip)
    return dataset, Path(args.images) if args.images else Path(args.annotations).parent


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n}" for n in names if not getattr(args, n)]
    if missing:
        raise ValueError(f"--from {args.source} needs {' and '.join(missing)}")


def _list_skipped(skipped: list[str], output: Path) -> None:
    print(f"skipped {len(skipped)} invalid records (--skip-invalid):", file=sys.stderr)
    for line in skipped[:_LISTED_SKIPS]:
        print(f"  {line}", file=sys.stderr)
    if len(skipped) > _LISTED_SKIPS:
        listing = output.with_name(output.stem + ".skipped.txt")
        atomic_write_text(listing, "".join(f"{line}\n" for line in skipped))
        print(
            f"  ... {len(skipped) - _LISTED_SKIPS} more, all listed in {listing}", file=sys.stderr
        )
