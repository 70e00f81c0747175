"""Heads: what sits on a backbone's features during training, kept apart from the backbone.

v1 has one: :class:`ClassifierHead`, the pseudo-label classifier. Cluster ids are arbitrary
and change at every clustering, so the head is thrown away and re-created (``reset(k)``)
after each one, while the backbone keeps its weights and its optimiser's momentum.
"""

from __future__ import annotations

import torch
from torch import nn

from deepcluster.models.base import REFERENCE_STD, Backbone


class ClassifierHead(nn.Module):
    """``relu(features) -> Linear(in_features, k)``: logits over k pseudo-labels.

    Args:
        in_features: width of the backbone's ``forward_features``.
        std: standard deviation of new weights (the reference's N(0, 0.01), or the
            backbone's width-scaled ``head_std``).

    Attributes:
        linear: the current ``Linear(in_features, k)``, ``None`` before the first ``reset``.
    """

    def __init__(self, in_features: int, std: float = REFERENCE_STD) -> None:
        super().__init__()
        self.in_features, self.std = in_features, std
        self.linear: nn.Linear | None = None

    @classmethod
    def for_backbone(cls, backbone: Backbone) -> ClassifierHead:
        """A head that reads ``backbone``'s features, initialised as that backbone asks."""
        return cls(backbone.feature_dim, backbone.head_std)

    @property
    def n_outputs(self) -> int | None:
        """k, or ``None`` before the first ``reset``."""
        return None if self.linear is None else self.linear.out_features

    def reset(self, n_outputs: int, device: torch.device | str | None = None) -> nn.Linear:
        """Replace the layer by a fresh ``Linear(in_features, n_outputs)`` on ``device``:
        weights from N(0, std), bias zero, as in the reference."""
        layer = nn.Linear(self.in_features, n_outputs).to(device)
        nn.init.normal_(layer.weight, mean=0.0, std=self.std)
        nn.init.zeros_(layer.bias)
        self.linear = layer
        return layer

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, in_features) -> (B, k)``."""
        if self.linear is None:
            raise RuntimeError("call reset(n) before forward(): the head has no layer yet")
        return self.linear(torch.relu(features))


class WithHead(nn.Module):
    """A backbone and its head as one module, ``images -> head(forward_features(images))``:
    what the training pass runs (and what a process group's ``DistributedDataParallel``
    wraps)."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(images))


__all__ = ["ClassifierHead", "WithHead"]
