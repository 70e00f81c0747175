"""Image transforms in Pillow and plain PyTorch (no torchvision).

Workers turn each image into a ``uint8`` tensor ``(3, H, W)`` (cheap to pass between
processes); the main process converts whole batches to float and normalises them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB Pillow image -> ``(3, H, W)`` uint8 tensor."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` pixels, keeping the aspect ratio (bilinear)."""
    width, height = image.size
    if min(width, height) == size:
        return image
    if width <= height:
        new = (size, max(1, round(height * size / width)))
    else:
        new = (max(1, round(width * size / height)), size)
    return image.resize(new, Image.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Central ``size x size`` square (the image must be at least that large)."""
    width, height = image.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class CenterView:
    """The feature-pass view: resize the shorter side, then centre crop (256 then 224)."""

    resize: int
    crop: int

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return to_uint8_tensor(center_crop(resize_shorter(image, max(self.resize, self.crop)), self.crop))


@dataclass(frozen=True)
class RandomResizedCropFlip:
    """The training view: random resized crop, random horizontal flip, optional colour jitter.

    The crop covers a uniformly drawn share of the area in ``scale`` with a log-uniform
    aspect ratio in ``ratio`` (10 tries, then the largest central crop that fits), and is
    resized to ``size x size`` in one bilinear Pillow call.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip: bool = True
    color: ColorJitter | None = None

    def box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            crop_w = int(round(math.sqrt(target * aspect)))
            crop_h = int(round(math.sqrt(target / aspect)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                left = int(rng.integers(0, width - crop_w + 1))
                top = int(rng.integers(0, height - crop_h + 1))
                return left, top, left + crop_w, top + crop_h
        # Fallback: the central crop with the aspect ratio clamped into range.
        aspect = width / height
        if aspect < self.ratio[0]:
            crop_w, crop_h = width, int(round(width / self.ratio[0]))
        elif aspect > self.ratio[1]:
            crop_h, crop_w = height, int(round(height * self.ratio[1]))
        else:
            crop_w, crop_h = width, height
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        return left, top, left + crop_w, top + crop_h

    def view(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """The transformed Pillow image."""
        box = self.box(image.width, image.height, rng)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=box)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.color is not None:
            image = self.color(image, rng)
        return image

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        return to_uint8_tensor(self.view(image, rng))


@dataclass(frozen=True)
class ColorJitter:
    """Random colour changes of a training view (not in the v1 paper; v2 and SimCLR use them).

    With probability ``p``: brightness, contrast and saturation factors drawn uniformly in
    ``[1 - strength, 1 + strength]`` and a hue shift in ``[-hue, hue]`` turns, applied in a
    random order; then, with probability ``grayscale``, the view becomes gray (three equal
    channels). Pillow only: ``ImageEnhance`` for the factors, HSV for the hue.
    """

    strength: float = 0.4
    hue: float = 0.1
    p: float = 0.8
    grayscale: float = 0.2

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        from PIL import ImageEnhance

        if self.p > 0 and rng.random() < self.p:
            low, high = max(0.0, 1.0 - self.strength), 1.0 + self.strength
            for op in rng.permutation(4):
                if op == 0 and self.strength > 0:
                    image = ImageEnhance.Brightness(image).enhance(rng.uniform(low, high))
                elif op == 1 and self.strength > 0:
                    image = ImageEnhance.Contrast(image).enhance(rng.uniform(low, high))
                elif op == 2 and self.strength > 0:
                    image = ImageEnhance.Color(image).enhance(rng.uniform(low, high))
                elif op == 3 and self.hue > 0:
                    hsv = np.asarray(image.convert("HSV")).copy()
                    shift = int(round(rng.uniform(-self.hue, self.hue) * 255))
                    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
                    image = Image.fromarray(hsv, "HSV").convert("RGB")
        if self.grayscale > 0 and rng.random() < self.grayscale:
            image = image.convert("L").convert("RGB")
        return image


def color_jitter(strength: float, grayscale: float) -> ColorJitter | None:
    """The training views' colour changes from the ``color_jitter`` and ``grayscale_prob``
    settings (hue up to a quarter of the strength, jitter with probability 0.8), or None when
    both are 0."""
    if strength == 0 and grayscale == 0:
        return None
    return ColorJitter(strength, strength / 4, 0.8, grayscale)


class Normalize:
    """uint8 batch ``(B, 3, H, W)`` -> float batch, scaled to [0, 1] then standardised."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def __call__(self, batch: torch.Tensor, device: torch.device | str = "cpu", channels_last: bool = False) -> torch.Tensor:
        batch = batch.to(device, non_blocking=True).float()
        batch = (batch - self.mean.to(device)) * self.inv_std.to(device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
