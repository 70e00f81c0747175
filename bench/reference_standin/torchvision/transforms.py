"""The transforms the authors' code uses, on PIL images, as torchvision 0.2 ran them."""

import math
import random

import numpy as np
import torch
from PIL import Image


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image


class Resize:
    """Shorter side to ``size`` pixels, aspect kept, bilinear."""

    def __init__(self, size, interpolation=Image.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image):
        width, height = image.size
        if min(width, height) == self.size:
            return image
        if width < height:
            return image.resize((self.size, int(self.size * height / width)), self.interpolation)
        return image.resize((int(self.size * width / height), self.size), self.interpolation)


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        width, height = image.size
        left, top = int(round((width - self.size) / 2.0)), int(round((height - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))


class RandomResizedCrop:
    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), interpolation=Image.BILINEAR):
        self.size, self.scale, self.ratio, self.interpolation = size, scale, ratio, interpolation

    def box(self, image):
        width, height = image.size
        area = width * height
        for _ in range(10):
            target = random.uniform(*self.scale) * area
            aspect = random.uniform(*self.ratio)
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if random.random() < 0.5:
                w, h = h, w
            if w <= width and h <= height:
                return random.randint(0, width - w), random.randint(0, height - h), w, h
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, side, side

    def __call__(self, image):
        left, top, w, h = self.box(image)
        return image.crop((left, top, left + w, top + h)).resize((self.size, self.size), self.interpolation)


class RandomHorizontalFlip:
    def __call__(self, image):
        return image.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < 0.5 else image


class ToTensor:
    """uint8 HWC -> float CHW in [0, 1]."""

    def __call__(self, image):
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().float().div_(255.0)


class Normalize:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, tensor):
        return tensor.sub_(self.mean).div_(self.std)
