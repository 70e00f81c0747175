"""DeepCluster-v2's heads: a projection to a normalised embedding, and prototype layers.

``backbone -> ProjectionHead -> L2-normalised embedding (128-d) -> Prototypes`` (several
bias-free linear layers, one per clustering head). The prototypes are never trained: every
epoch each layer's weights are overwritten by the unit-norm centroids of its spherical
k-means, so a crop's scores are the cosine similarities of its embedding with the
centroids. ``MultiCropModel.forward`` runs the backbone once per run of consecutive crops of
equal size (two 224 px crops in one pass, six 96 px crops in another), as SwAV's code does.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deepcluster.models.base import Backbone


class ProjectionHead(nn.Module):
    """``Linear(in, hidden) -> BatchNorm -> ReLU -> Linear(hidden, out)``, then L2-normalised.

    Args:
        in_features: width of the backbone's pooled features (2,048 for ResNet-50).
        hidden: width of the hidden layer (2,048 in SwAV's code; 0 = a single linear layer).
        out_features: width of the embedding (128).
    """

    def __init__(self, in_features: int, hidden: int = 2048, out_features: int = 128) -> None:
        super().__init__()
        if hidden:
            self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, out_features))
        else:
            self.mlp = nn.Sequential(nn.Linear(in_features, out_features))
        self.out_features = out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, in_features) -> (B, out_features)``, each row of unit norm."""
        return F.normalize(self.mlp(features), dim=1)


class Prototypes(nn.Module):
    """One bias-free ``Linear(dim, k_h)`` per head, frozen: ``set(h, centroids)`` writes them.

    Args:
        dim: embedding width.
        counts: prototypes per head (the reference: 3 heads of 3,000).
    """

    def __init__(self, dim: int, counts: Sequence[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, count, bias=False) for count in counts)
        for head in self.heads:
            head.weight.requires_grad_(False)

    @property
    def counts(self) -> list[int]:
        return [head.out_features for head in self.heads]

    @torch.no_grad()
    def set(self, head: int, centroids: torch.Tensor) -> None:
        """Overwrite head ``head``'s weights with ``(k_h, dim)`` centroids."""
        self.heads[head].weight.copy_(centroids)

    def forward(self, embeddings: torch.Tensor) -> list[torch.Tensor]:
        """``(B, dim)`` -> one ``(B, k_h)`` score tensor per head."""
        return [head(embeddings) for head in self.heads]


class PrototypeHead(nn.Module):
    """v2's head on a backbone: the projection and the prototypes, kept as one module (the
    checkpoint's ``head``), ``features -> (embeddings, scores per head)``."""

    def __init__(self, projection: ProjectionHead, prototypes: Prototypes) -> None:
        super().__init__()
        self.projection, self.prototypes = projection, prototypes

    @classmethod
    def for_backbone(cls, backbone: Backbone, hidden: int, dim: int, counts: Sequence[int]) -> PrototypeHead:
        return cls(ProjectionHead(backbone.clustered_dim, hidden, dim), Prototypes(dim, counts))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        embeddings = self.projection(features)
        return embeddings, self.prototypes(embeddings)


class Embedder(nn.Module):
    """Backbone then projection: ``images -> (B, dim)`` unit embeddings, offered as
    ``forward_clustered`` so THE feature pass (``deepcluster.features``) computes what v2
    clusters, for the final clustering and for ``assign``."""

    def __init__(self, backbone: Backbone, projection: ProjectionHead) -> None:
        super().__init__()
        self.backbone, self.projection = backbone, projection
        self.arch = backbone.arch

    @property
    def clustered_dim(self) -> int:
        return self.projection.out_features

    def forward_clustered(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone.forward_clustered(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_clustered(images)


def crop_groups(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive crops with the same spatial size."""
    groups, start = [], 0
    for index in range(1, len(crops) + 1):
        if index == len(crops) or crops[index].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, index))
            start = index
    return groups


class MultiCropModel(nn.Module):
    """Backbone, projection and prototypes: ``crops -> (embeddings, scores per head)``."""

    def __init__(self, backbone: Backbone, projection: ProjectionHead, prototypes: Prototypes) -> None:
        super().__init__()
        self.backbone, self.projection, self.prototypes = backbone, projection, prototypes

    def forward(self, crops: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Args:
            crops: ``n_crops`` batches ``(B, 3, H_i, W_i)`` of the same images, large ones first.

        Returns:
            ``(n_crops * B, dim)`` embeddings, crop by crop, and the prototypes' scores of
            them, one ``(n_crops * B, k_h)`` tensor per head.
        """
        features = [self.backbone.forward_clustered(torch.cat(list(crops[start:stop])))
                    for start, stop in crop_groups(crops)]
        embeddings = self.projection(torch.cat(features))
        return embeddings, self.prototypes(embeddings)
