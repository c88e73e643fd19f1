"""Checking a COCO-format dataset before training on it: every annotation against the loader's
own rules (`retinanet.data.coco.check_coco_dict`) and every image decoded as the loader would
(`decode_image`), in parallel, into one report of everything wrong. On a 118k-image dataset one
bad file would otherwise end a run hours in."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from retinanet.data.coco import (
    ERROR,
    DatasetError,
    DatasetProblem,
    ImageError,
    ProblemList,
    decode_image,
    read_coco_annotations,
    sort_by_kind,
)


@dataclasses.dataclass
class DatasetCheck(ProblemList):
    """What `check_dataset` found.

    num_images, num_annotations, num_categories: records in the annotation file.
    num_decoded: images that decoded at the size the JSON gives.
    problems: errors (the loader refuses the dataset or cannot use the image) and repairs (the
        loader clips, drops or skips, with a warning), annotation-file problems first, then
        images in id order, then annotations in file order.
    seconds: wall time of the check.
    """

    image_dir: str
    annotation_file: str
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    num_decoded: int = 0
    problems: list[DatasetProblem] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def passed(self, strict: bool = False) -> bool:
        """No errors (and with `strict`, no repairs either)."""
        return not (self.problems if strict else self.errors)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: paths, counts and every problem as a dict."""
        return {
            "image_dir": self.image_dir,
            "annotation_file": self.annotation_file,
            "num_images": self.num_images,
            "num_annotations": self.num_annotations,
            "num_categories": self.num_categories,
            "num_decoded": self.num_decoded,
            "num_errors": len(self.errors),
            "num_repairs": len(self.repairs),
            "seconds": round(self.seconds, 3),
            "problems": [dataclasses.asdict(p) for p in self.problems],
        }

    def summary(self) -> str:
        """One line: what was checked and how much is wrong."""
        return (
            f"{self.annotation_file}: {self.num_images} images ({self.num_decoded} decoded), "
            f"{self.num_annotations} annotations, {self.num_categories} categories checked in "
            f"{self.seconds:.1f} s: {len(self.errors)} errors, {len(self.repairs)} repairs"
        )

    def lines(self, limit: int | None = None) -> list[str]:
        """The summary, then one line per problem (errors first), at most `limit` of them."""
        ordered = self.errors + self.repairs
        shown = ordered[:limit]
        lines = [self.summary()] + [f"  {p.severity}: {p.message}" for p in shown]
        if len(shown) < len(ordered):
            lines.append(f"  ... and {len(ordered) - len(shown)} more")
        return lines


def check_dataset(
    image_dir: str | os.PathLike,
    annotation_file: str | os.PathLike,
    workers: int | None = None,
    progress: bool = False,
) -> DatasetCheck:
    """Check every record of `annotation_file` and decode every image it lists from
    `image_dir` with `workers` threads (default: the CPU count; OpenCV decodes without holding
    the GIL). Never raises for a problem of the dataset: an unusable annotation file or image
    folder is reported as a problem of kind "file"."""
    start = time.perf_counter()
    report = DatasetCheck(str(image_dir), str(annotation_file))
    try:
        records = read_coco_annotations(annotation_file)
    except DatasetError as err:
        report.problems.append(DatasetProblem(ERROR, "file", "annotation_file", str(err)))
        report.seconds = time.perf_counter() - start
        return report
    report.num_images = records.num_images
    report.num_annotations = records.num_annotations
    report.num_categories = records.num_categories
    image_problems: list[DatasetProblem] = []
    if not Path(image_dir).is_dir():
        image_problems.append(
            DatasetProblem(ERROR, "file", "image_dir", f"image folder not found: {image_dir}")
        )
    else:
        columns = (records.image_ids, records.file_names, records.widths, records.heights)
        jobs = [
            (str(Path(image_dir) / name), int(image_id), name, (int(height), int(width)))
            for image_id, name, width, height in zip(*columns, strict=True)
        ]
        decoded = _decode_all(jobs, records.source, workers)
        bar = tqdm(decoded, total=len(jobs), desc="decoding", disable=not progress, leave=False)
        for problem in bar:
            if problem is None:
                report.num_decoded += 1
            else:
                image_problems.append(problem)
    # Image records, then image files, within the problems of images.
    report.problems = sort_by_kind([*records.problems, *image_problems])
    report.seconds = time.perf_counter() - start
    return report


def _decode_all(
    jobs: list[tuple[str, int, str, tuple[int, int]]], source: str, workers: int | None
) -> Iterator[DatasetProblem | None]:
    """The problem of each image (None when it decodes at its size), in the order of `jobs`."""
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def check(job: tuple[str, int, str, tuple[int, int]]) -> DatasetProblem | None:
        path, image_id, name, size = job
        try:
            if not os.path.isfile(path):  # as the loader checks: a folder counts as missing
                raise ImageError(
                    f"image {path} (image id {image_id}) is missing", "missing", image_id, path
                )
            decode_image(path, image_id, size, source)
        except ImageError as err:
            return DatasetProblem(ERROR, "image", err.code, str(err), image_id, None, name)
        return None

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check-dataset") as pool:
        # map() yields in submission order, so the report does not depend on thread timing.
        yield from pool.map(check, jobs)
