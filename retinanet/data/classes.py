"""The classes of a dataset: names and COCO category ids, by the model's contiguous class index.
Stored in checkpoints, so a trained model reports the ids of the dataset it learnt."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ClassInfo:
    """Class names and the dataset category id of each contiguous class index."""

    names: list[str]
    category_ids: list[int]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.category_ids):
            raise ValueError(
                f"{len(self.names)} class names but {len(self.category_ids)} category ids"
            )

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, list]:
        return {"names": list(self.names), "category_ids": [int(c) for c in self.category_ids]}
