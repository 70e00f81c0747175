"""Backbones with one interface, created by name."""

from __future__ import annotations

from deepcluster.models.alexnet import AlexNet
from deepcluster.models.base import Backbone
from deepcluster.models.export import (BackboneMetadata, ExportError, load_backbone_safetensors, preprocess_images,
                                       read_backbone_metadata, save_backbone_safetensors)
from deepcluster.models.small import SmallNet
from deepcluster.models.sobel import SobelFilter
from deepcluster.models.vgg import VGG16

MODELS: dict[str, type[Backbone]] = {"alexnet": AlexNet, "vgg16": VGG16, "smallnet": SmallNet}


def create_model(arch: str, sobel: bool = True, feature_dim: int | None = None) -> Backbone:
    """Build a backbone by name (``alexnet``, ``vgg16`` or ``smallnet``).

    Args:
        arch: registry name.
        sobel: put the fixed grayscale + Sobel input filter in front.
        feature_dim: width of the fully connected layers; ``None`` keeps the
            architecture's default (4096 for AlexNet and VGG-16, 512 for the small net).

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    if arch not in MODELS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(sorted(MODELS))}")
    kwargs = {} if feature_dim is None else {"feature_dim": feature_dim}
    return MODELS[arch](sobel=sobel, **kwargs)


__all__ = ["AlexNet", "Backbone", "BackboneMetadata", "ExportError", "MODELS", "SmallNet", "SobelFilter", "VGG16",
           "create_model", "load_backbone_safetensors", "preprocess_images", "read_backbone_metadata",
           "save_backbone_safetensors"]
