"""Pseudo-labelled data: the training set built from one clustering, and its sampler."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from deepcluster.data.sources import ImageSource
from deepcluster.data.transforms import CenterView, RandomResizedCropFlip


def uniform_cluster_sample(assignments: np.ndarray, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of one epoch drawn uniformly over the non-empty clusters.

    The reference quota rule: each non-empty cluster gets ``n_samples // n_nonempty + 1``
    draws, without replacement when it holds more images than that and with replacement
    otherwise; the draws are shuffled and cut to ``n_samples``. This weighs every image's
    loss by the inverse of its cluster's size, in expectation, so a few huge clusters
    cannot dominate training (the paper's defence against trivial parametrisation).

    Args:
        assignments: ``(N,)`` cluster id of each image; negative ids (unusable images)
            are never drawn.
        n_samples: length of the epoch, usually the number of usable images.
        rng: source of randomness.

    Returns:
        ``(n_samples,)`` int64 image indices.
    """
    assignments = np.asarray(assignments)
    valid = np.flatnonzero(assignments >= 0)
    order = valid[np.argsort(assignments[valid], kind="stable")]
    clusters, starts = np.unique(assignments[order], return_index=True)
    members = np.split(order, starts[1:])
    if not members or n_samples <= 0:
        return np.zeros(0, dtype=np.int64)
    quota = n_samples // len(members) + 1
    draws = [rng.choice(images, quota, replace=len(images) <= quota) for images in members]
    sample = np.concatenate(draws).astype(np.int64)
    rng.shuffle(sample)
    if len(sample) < n_samples:  # cannot happen with the +1 quota, kept for safety
        sample = np.resize(sample, n_samples)
    return sample[:n_samples]


def item_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The random stream of one training sample: a pure function of where it is, so the
    augmentations do not depend on the number of workers or on a resume."""
    return np.random.default_rng((seed, epoch, position))


class FeatureDataset(Dataset):
    """Every image in its centre view: ``(uint8 image, index, ok)``.

    An image that fails to decode yields a black image and ``ok = False``; the feature pass
    records it as unusable instead of stopping the run.
    """

    def __init__(self, source: ImageSource, view: CenterView):
        self.source, self.view = source, view

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            return self.view(self.source.load(index)), index, True
        except Exception:  # noqa: BLE001 - any decode failure marks the file unusable
            return torch.zeros(3, self.view.crop, self.view.crop, dtype=torch.uint8), index, False


# Target of a training sample whose image could not be read: the loss ignores it.
UNREADABLE = -1


class PseudoLabelDataset(Dataset):
    """One epoch of training samples: ``(uint8 image, pseudo-label, image index)`` of image
    ``indices[i]``.

    An image that fails to decode here (it decoded in the feature pass, so it changed or
    vanished since) yields a black image with target ``UNREADABLE``: the training pass
    leaves it out of the loss and records it instead of stopping the run.

    Args:
        source: the images.
        indices: ``(n,)`` image index of each sample (from ``uniform_cluster_sample``).
        assignments: ``(N,)`` cluster id of every image.
        transform: the training augmentation.
        seed, epoch: identify the random stream of each sample (see ``item_rng``).
        positions: ``(n,)`` position of each sample in the epoch's whole list (a process's
            share of it holds every ``world_size``-th); default ``0 .. n - 1``. Seeds its
            augmentation, so a sample is augmented alike whatever the number of processes.
    """

    def __init__(self, source: ImageSource, indices: np.ndarray, assignments: np.ndarray,
                 transform: RandomResizedCropFlip, seed: int, epoch: int, positions: np.ndarray | None = None):
        self.source, self.indices, self.assignments = source, indices, assignments
        self.transform, self.seed, self.epoch = transform, seed, epoch
        self.positions = positions

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = int(self.indices[position])
        try:
            where = position if self.positions is None else int(self.positions[position])
            image = self.transform(self.source.load(index), item_rng(self.seed, self.epoch, where))
        except Exception:  # noqa: BLE001 - any decode failure: left out of the loss
            size = self.transform.size
            return torch.zeros(3, size, size, dtype=torch.uint8), UNREADABLE, index
        return image, int(self.assignments[index]), index
