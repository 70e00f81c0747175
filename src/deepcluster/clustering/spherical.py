"""DeepCluster-v2's spherical k-means, as :func:`deepcluster.clustering.kmeans.kmeans` runs it.

A compatibility front for the v2 method: ``spherical_kmeans(points, k, n_iter, seed, empty)``
is ``kmeans(points, k, n_iter, seed, backend="torch", init="randperm", metric="cosine",
empty=..., shard=True)`` on the points' device, with torch tensors in the result. Its
``empty`` names are v2's setting's: ``keep`` (SwAV's reference) and ``split`` (the
``nudge`` rule of :mod:`deepcluster.clustering.empty`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deepcluster.clustering.kmeans import kmeans
from deepcluster.clustering.search import best_dot

# v2's ``empty_clusters`` setting -> the unified k-means' empty-cluster rule
EMPTY_RULE_OF = {"keep": "keep", "split": "nudge"}
EMPTY_POLICIES = tuple(EMPTY_RULE_OF)
nearest_centroids = best_dot  # (N, d), (k, d) -> (N,) labels, (N,) dot products


@dataclass
class SphericalResult:
    """Outcome of one spherical k-means (tensors on the points' device).

    Attributes:
        assignments: ``(N,)`` int64 centroid of each (local) point, from the final centroids.
        centroids: ``(k, d)`` unit-norm float32 centroids.
        objective: mean dot product of the points with their centroid, at each assignment
            step (``n_iter + 1`` values).
        n_empty: clusters with no point at the final assignment.
        n_split: empty clusters re-seeded (``empty="split"`` only).
    """

    assignments: torch.Tensor
    centroids: torch.Tensor
    objective: list[float] = field(default_factory=list)
    n_empty: int = 0
    n_split: int = 0


def spherical_kmeans(points: torch.Tensor, n_clusters: int, n_iter: int = 10, seed: int = 0,
                     empty: str = "keep") -> SphericalResult:
    """Cluster unit-norm ``points`` ``(N, d)`` (this process's rows of the default process
    group, if any) into ``n_clusters`` by the cosine metric.

    Raises:
        ValueError: unknown ``empty`` policy, or fewer points than clusters.
    """
    if empty not in EMPTY_RULE_OF:
        raise ValueError(f"unknown empty-cluster policy {empty!r}; choose one of: {', '.join(EMPTY_POLICIES)}")
    result = kmeans(points, n_clusters, n_iter, seed, backend="torch", init="randperm", device=points.device,
                    metric="cosine", empty=EMPTY_RULE_OF[empty], shard=True)
    return SphericalResult(torch.from_numpy(result.assignments).to(points.device),
                           torch.from_numpy(result.centroids).to(points.device), result.objective, result.n_empty,
                           result.n_split)


__all__ = ["EMPTY_POLICIES", "SphericalResult", "nearest_centroids", "spherical_kmeans"]
