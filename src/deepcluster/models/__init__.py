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
FC_INITS = ("reference", "width")


def create_model(arch: str, sobel: bool = True, feature_dim: int | None = None, fc_init: str = "reference",
                 clustered: str = "fc") -> Backbone:
    """Build a backbone by name (``alexnet``, ``vgg16`` or ``smallnet``).

    Args:
        arch: registry name.
        sobel: put the fixed grayscale + Sobel input filter in front.
        feature_dim: width of the fully connected layers; ``None`` keeps the
            architecture's default (4096 for AlexNet and VGG-16, 512 for the small net).
        fc_init: ``reference`` draws every fully connected layer (and later heads) from
            N(0, 0.01) as the authors do; ``width`` scales each to
            N(0, 0.01 * sqrt(4096 / fan_in)), the gain the reference gives its 4096-wide
            layers, so narrow layers are not started near zero (see ``Backbone.scale_fc_init``).
        clustered: ``fc`` (the paper) or ``body``: what the feature pass returns
            (``Backbone.forward_clustered``).

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    if arch not in MODELS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(sorted(MODELS))}")
    if fc_init not in FC_INITS:
        raise ValueError(f"unknown fc_init {fc_init!r}; choose one of: {', '.join(FC_INITS)}")
    kwargs = {} if feature_dim is None else {"feature_dim": feature_dim}
    model = MODELS[arch](sobel=sobel, **kwargs)
    if fc_init == "width":
        model.scale_fc_init()
    if clustered not in ("fc", "body"):
        raise ValueError(f"unknown clustered features {clustered!r}; choose fc or body")
    model.clustered = clustered
    return model


__all__ = ["AlexNet", "Backbone", "BackboneMetadata", "ExportError", "MODELS", "SmallNet", "SobelFilter", "VGG16",
           "create_model", "load_backbone_safetensors", "preprocess_images", "read_backbone_metadata",
           "save_backbone_safetensors"]
