r"""Check a COCO-format dataset before training: validate every annotation by the loader's rules
and decode every image, in parallel, listing everything wrong.

    retinanet check-dataset --config configs/shapes.yaml [--split train|val|all] [key=value ...]
    retinanet check-dataset --images datasets/coco/val2017 \
        --annotations datasets/coco/annotations/instances_val2017.json --output report.json

Errors are what the loader refuses or cannot read: a malformed record, a duplicate or unknown
id, a missing, unreadable or truncated image, an image whose size differs from the JSON's.
Repairs are what the loader fixes with a warning: boxes clipped to their image, boxes under
1 px dropped, annotations of unknown images skipped. Exit status: 0 when there is no error
(with --strict: no repair either), 1 otherwise. --output writes the full report as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from retinanet.data.check import DatasetCheck, check_dataset
from retinanet.files import atomic_write_json

_LISTED = 50  # problems printed per dataset; --output holds all of them


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config whose data.* to check")
    parser.add_argument("--split", choices=("train", "val", "all"), default="all")
    parser.add_argument("--images", help="image folder (instead of --config)")
    parser.add_argument("--annotations", help="instances JSON (with --images)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding threads")
    parser.add_argument("--output", help="write the full report to this JSON")
    parser.add_argument("--strict", action="store_true", help="repairs count as failures too")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="with --config")


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    checks = [
        (split, check_dataset(image_dir, annotation_file, args.workers, progress=True))
        for split, image_dir, annotation_file in _datasets(args)
    ]
    passed = all(check.passed(args.strict) for _, check in checks)
    if args.output:
        atomic_write_json(
            args.output,
            {
                "passed": passed,
                "strict": args.strict,
                "datasets": [{"split": split, **check.to_dict()} for split, check in checks],
            },
        )
    for split, check in checks:
        _print_check(split, check)
    if args.output:
        _print(f"report: {args.output}")
    _print("passed" if passed else "FAILED")
    return 0 if passed else 1


def _datasets(args: argparse.Namespace) -> list[tuple[str | None, str, str]]:
    """(split or None, image folder, annotation file) of each dataset to check."""
    if args.config is None:
        if not (args.images and args.annotations):
            raise ValueError("give --config, or both --images and --annotations")
        if args.overrides:
            raise ValueError(f"key=value overrides need --config (got {args.overrides})")
        return [(None, args.images, args.annotations)]
    if args.images or args.annotations:
        raise ValueError("give either --config or --images/--annotations, not both")
    from retinanet.config import load_config
    from retinanet.data.build import resolve_data_paths

    cfg = resolve_data_paths(load_config(Path(args.config), args.overrides))
    splits = ("train", "val") if args.split == "all" else (args.split,)
    datasets = []
    for split in splits:
        paths = getattr(cfg.data, split)
        if not paths.image_dir or not paths.annotation_file:
            raise ValueError(f"data.{split}.image_dir and data.{split}.annotation_file are not set")
        datasets.append((split, paths.image_dir, paths.annotation_file))
    return datasets


def _print_check(split: str | None, check: DatasetCheck) -> None:
    lines = check.lines(limit=_LISTED)
    if split is not None:
        lines[0] = f"[{split}] {lines[0]}"
    for line in lines:
        _print(line)


def _print(line: str) -> None:
    """print(), with characters the terminal cannot show (a file name that is not valid
    Unicode, say) escaped instead of failing."""
    encoding = sys.stdout.encoding or "utf-8"
    print(line.encode(encoding, "backslashreplace").decode(encoding, "replace"))
