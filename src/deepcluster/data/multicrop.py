"""DeepCluster-v2's views: several random resized crops of one image, at two sizes.

The reference (SwAV's code, ImageNet): 2 crops of 224 px covering 14-100% of the image and
6 of 96 px covering 5-14%, each flipped with probability 1/2, colour-jittered (with
probability 0.8: brightness, contrast, saturation 0.8, hue 0.2), made gray with probability
0.2 and blurred with probability 1/2 (Gaussian, radius 0.1-2 px). For 32 px images
(solo-learn's CIFAR recipe): 2 crops of 32 px over 8-100%, no blur.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset, default_collate

from deepcluster.data.sources import ImageSource
from deepcluster.data.transforms import ColorJitter, RandomResizedCropFlip, to_uint8_tensor


@dataclass(frozen=True)
class CropGroup:
    """``count`` crops of ``size`` px, each covering a share of the image area in ``scale``."""

    size: int
    count: int
    scale: tuple[float, float]


@dataclass(frozen=True)
class MultiCrop:
    """All crops of one image, large ones first: ``(image, rng) -> [uint8 (3, size, size), ...]``.

    Args:
        groups: the crop sizes, counts and scales.
        color: colour jitter and grayscale of every crop (``None`` = off).
        blur: probability of a Gaussian blur of a crop, radius uniform in ``blur_radius``.
        flip: random horizontal flips.
    """

    groups: tuple[CropGroup, ...]
    color: ColorJitter | None = ColorJitter(strength=0.8, hue=0.2, p=0.8, grayscale=0.2)
    blur: float = 0.5
    blur_radius: tuple[float, float] = (0.1, 2.0)
    flip: bool = True

    @property
    def n_crops(self) -> int:
        return sum(group.count for group in self.groups)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> list[torch.Tensor]:
        crops = []
        for group in self.groups:
            crop = RandomResizedCropFlip(group.size, scale=group.scale, flip=self.flip, color=self.color)
            for _ in range(group.count):
                view = crop.view(image, rng)
                if self.blur > 0 and rng.random() < self.blur:
                    view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.blur_radius)))
                crops.append(to_uint8_tensor(view))
        return crops


# Targets of a sample whose image could not be read: ignored by the loss in every head
# (the same value as ``data.pseudo.UNREADABLE`` and ``losses.IGNORE``).
UNREADABLE = -1


class MultiCropDataset(Dataset):
    """One epoch of v2 training samples: ``([uint8 crop, ...], (n_heads,) targets, image index)``.

    Args:
        source: the images.
        indices: ``(n,)`` image index of each sample.
        targets: ``(n_heads, N)`` int64 assignments of every image in every head.
        transform: the crops of one image.
        seed, epoch: with the sample's position, the seed of its random stream (a pure
            function of where it is, as for v1, so workers and resumes do not matter).
        stream: a further number mixed into that seed, for passes other than training
            (the memory bank's first filling).
        positions: ``(n,)`` position of each sample in the epoch's whole list (a process's
            share under ``torchrun``), used instead of its place in ``indices``, so that each
            image gets the crops it gets in a single-process run (default: its place).

    An image that fails to decode yields black crops and targets ``UNREADABLE``.
    """

    def __init__(self, source: ImageSource, indices: np.ndarray, targets: np.ndarray, transform: MultiCrop,
                 seed: int, epoch: int, stream: int | None = None, positions: np.ndarray | None = None) -> None:
        self.source, self.indices, self.targets = source, indices, targets
        self.transform, self.seed, self.epoch, self.stream = transform, seed, epoch, stream
        self.positions = positions

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = int(self.indices[position])
        position = position if self.positions is None else int(self.positions[position])
        key = (self.seed, self.epoch, position) if self.stream is None else (self.seed, self.epoch, position,
                                                                             self.stream)
        try:
            crops = self.transform(self.source.load(index), np.random.default_rng(key))
        except Exception:  # noqa: BLE001 - any decode failure: left out of the loss
            crops = [torch.zeros(3, group.size, group.size, dtype=torch.uint8)
                     for group in self.transform.groups for _ in range(group.count)]
            return crops, torch.full((len(self.targets),), UNREADABLE, dtype=torch.int64), index
        return crops, torch.from_numpy(self.targets[:, index].astype(np.int64)), index


def collate_crops(groups: tuple[CropGroup, ...], samples: list) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A batch of ``MultiCropDataset`` samples, as ``default_collate`` makes it; an empty one
    (a process with no image in a step that the others take) as zero-row tensors of the
    crops' shapes, ``(0, n_heads)`` targets (one head) and ``(0,)`` indices."""
    if samples:
        return default_collate(samples)
    crops = [torch.zeros(0, 3, group.size, group.size, dtype=torch.uint8) for group in groups
             for _ in range(group.count)]
    return crops, torch.zeros(0, 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
