"""Backbones with one interface, created by name: the one registry of architectures.

``ARCHITECTURES`` is the only list of architecture names: the configuration's choices and
crop limits, ``create_model`` and the export all read it. This module imports no torch
(the classes load on first use), so the configuration and ``--help`` stay light.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepcluster.config import Config
    from deepcluster.models.base import Backbone


@dataclass(frozen=True)
class Architecture:
    """One registered backbone.

    Attributes:
        module, class_name: where its ``Backbone`` subclass lives.
        min_crop: smallest square input (px) its pooling stages do not shrink to nothing
            (measured by a forward pass; tests/test_bad_settings.py checks it).
        about: one line for ``--help``.
        stems: the first layers it offers (``stem`` setting); empty = one fixed design.
    """

    module: str
    class_name: str
    min_crop: int
    about: str
    stems: tuple[str, ...] = ()


ARCHITECTURES: dict[str, Architecture] = {
    "alexnet": Architecture("deepcluster.models.alexnet", "AlexNet", 63, "with BatchNorm, as the reference"),
    "vgg16": Architecture("deepcluster.models.vgg", "VGG16", 32, "with BatchNorm, as the reference"),
    "smallnet": Architecture("deepcluster.models.small", "SmallNet", 16, "7 conv layers, for 32-96 px images"),
    "resnet18": Architecture("deepcluster.models.resnet", "ResNet18", 1, "stem imagenet or cifar",
                             ("imagenet", "cifar")),
    "resnet50": Architecture("deepcluster.models.resnet", "ResNet50", 1, "stem imagenet or cifar",
                             ("imagenet", "cifar")),
}
STEMS = ("imagenet", "cifar")
FC_INITS = ("reference", "width")
CLUSTERED = ("fc", "body")


def backbone_class(arch: str) -> type[Backbone]:
    """The ``Backbone`` subclass registered as ``arch``.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(sorted(ARCHITECTURES))}")
    spec = ARCHITECTURES[arch]
    return getattr(importlib.import_module(spec.module), spec.class_name)


def create_model(arch: str, sobel: bool = True, feature_dim: int | None = None, fc_init: str = "reference",
                 clustered: str = "fc", stem: str = "imagenet") -> Backbone:
    """Build a backbone by its ``ARCHITECTURES`` name.

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
        stem: a ResNet's first layers: ``imagenet`` (7x7/2 conv and max-pool) or ``cifar``
            (3x3/1 conv, no max-pool, for 32-96 px images); other architectures have one.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    cls = backbone_class(arch)
    if fc_init not in FC_INITS:
        raise ValueError(f"unknown fc_init {fc_init!r}; choose one of: {', '.join(FC_INITS)}")
    kwargs: dict[str, Any] = {} if feature_dim is None else {"feature_dim": feature_dim}
    if ARCHITECTURES[arch].stems:
        if stem not in ARCHITECTURES[arch].stems:
            raise ValueError(f"unknown stem {stem!r}; choose one of: {', '.join(ARCHITECTURES[arch].stems)}")
        kwargs["stem"] = stem
    elif stem != "imagenet":
        raise ValueError(f"stem {stem!r} applies to the ResNets only; {arch} has one fixed design")
    model = cls(sobel=sobel, **kwargs)
    if fc_init == "width":
        model.scale_fc_init()
    if clustered not in CLUSTERED:
        raise ValueError(f"unknown clustered features {clustered!r}; choose one of: {', '.join(CLUSTERED)}")
    model.clustered = clustered
    return model


def model_from_config(config: Config) -> Backbone:
    """The backbone a run's settings describe (fresh weights, drawn from torch's generator)."""
    return create_model(config.arch, sobel=config.sobel, feature_dim=config.feature_dim, fc_init=config.fc_init,
                        clustered=config.clustered, stem=config.stem)


# Loaded on first use (PEP 562), so that importing the registry does not import torch.
_LAZY = {
    "Backbone": "deepcluster.models.base", "SobelFilter": "deepcluster.models.sobel",
    "BackboneMetadata": "deepcluster.models.export", "ExportError": "deepcluster.models.export",
    "load_backbone_safetensors": "deepcluster.models.export", "preprocess_images": "deepcluster.models.export",
    "read_backbone_metadata": "deepcluster.models.export", "save_backbone_safetensors": "deepcluster.models.export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ARCHITECTURES", "Architecture", "CLUSTERED", "FC_INITS", "STEMS", "backbone_class",
           "create_model", "model_from_config", *_LAZY]
