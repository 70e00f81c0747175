"""A labelled training/validation pair of class folders, in one class numbering, optionally
a random subset of each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from deepcluster.data import DataError, FolderSource, ImageSource


class SubsetSource(ImageSource):
    """The images ``indices`` of another source, with their labels."""

    def __init__(self, source: ImageSource, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
        self.labels = None if source.labels is None else source.labels[self.indices]
        self.class_names = source.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.source.load(int(self.indices[index]))

    def name(self, index: int) -> str:
        return self.source.name(int(self.indices[index]))


@dataclass
class LabelledSplits:
    """A training and a validation split with labels in one class numbering."""

    train: ImageSource
    train_labels: np.ndarray
    val: ImageSource
    val_labels: np.ndarray
    class_names: list[str]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def _limit(source: ImageSource, limit: int | None, seed: int) -> ImageSource:
    if limit is None or limit >= len(source):
        return source
    chosen = np.sort(np.random.default_rng(seed).choice(len(source), limit, replace=False))
    return SubsetSource(source, chosen)


def open_labelled_splits(train_dir: str | Path, val_dir: str | Path, train_limit: int | None = None,
                         val_limit: int | None = None, seed: int = 0) -> LabelledSplits:
    """Open two class-folder trees; validation classes are mapped to the training numbering.

    Raises:
        DataError: a folder is missing, unlabelled (no class sub-folders), has fewer than
            two classes, or the validation split has a class the training split lacks.
    """
    sources = {}
    for split, folder in (("training", train_dir), ("validation", val_dir)):
        source = FolderSource(folder)
        if source.labels is None or source.class_names is None:
            raise DataError(f"{split} folder {str(folder)!r} has no class labels: {source.unlabelled}; evaluation "
                            "needs them")
        sources[split] = source
    train, val = sources["training"], sources["validation"]
    class_names = list(train.class_names)
    if len(class_names) < 2:
        raise DataError(f"training folder {str(train_dir)!r} has {len(class_names)} class; evaluation needs at least 2")
    missing = sorted(set(val.class_names) - set(class_names))
    if missing:
        raise DataError(f"validation classes {', '.join(missing[:5])} are not in the training folder "
                        f"{str(train_dir)!r}")
    remap = np.array([class_names.index(name) for name in val.class_names], dtype=np.int64)
    train_subset = _limit(train, train_limit, seed)
    val_subset = _limit(val, val_limit, seed + 1)
    return LabelledSplits(train_subset, np.asarray(train_subset.labels, dtype=np.int64),
                          val_subset, remap[np.asarray(val_subset.labels)], class_names)


__all__ = ["LabelledSplits", "SubsetSource", "open_labelled_splits"]
