"""The per-epoch result of the clustering, whatever the method: a pseudo-label per image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from deepcluster.data import DataError

if TYPE_CHECKING:
    from deepcluster.clustering.pca import PCA


@dataclass
class Partition:
    """One clustering of the images: a pseudo-label for every image (-1 where unusable).

    Attributes:
        assignments: ``(N,)`` int64 pseudo-label of every image.
        n_clusters: number of pseudo-labels (k for k-means; found by PIC).
        centroids: ``(n_clusters, pca_dim)`` cluster centres in the PCA space (for PIC,
            cluster means; for v2, unit-norm centroids of the embeddings), to place new images.
        objective: mean squared distance to the centroid (v1's k-means only).
        n_split: empty clusters re-seeded during k-means.
        pca: the projection fitted this epoch (None for v2, which clusters unit embeddings).
        time_pca: seconds spent fitting the PCA and projecting.
        time_kmeans: seconds spent in k-means (or PIC).
    """

    assignments: np.ndarray
    n_clusters: int
    centroids: np.ndarray
    objective: float | None
    n_split: int
    pca: PCA | None
    time_pca: float
    time_kmeans: float


class TooFewDecoded(DataError):
    """Fewer images decoded than the clustering needs (the run writes ``skipped.tsv`` first)."""


__all__ = ["Partition", "TooFewDecoded"]
