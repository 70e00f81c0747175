"""Spherical k-means: DeepCluster-v2's clustering of the memory bank.

Points and centroids lie on the unit sphere; a point goes to the centroid of largest dot
product, and a centroid moves to the normalised sum of its points. The objective (mean dot
product of each point with its centroid) never falls from one iteration to the next.
Starting centroids are points drawn at random. A cluster left empty keeps its previous
centroid (the reference's choice, ``empty="keep"``) or takes half of a large cluster
(``empty="split"``: the donor's centroid nudged apart, as v1's k-means does).

With a process group, each process holds a shard of the points; the starting centroids
are drawn from the first process's shard and broadcast, and the sums and sizes are
all-reduced, so every process ends with the same centroids and its own assignments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deepcluster import distributed

EMPTY_POLICIES = ("keep", "split")
SPLIT_EPS = 1.0 / 1024.0
BLOCK_ROWS = 1 << 15  # rows scored at once: bounds the (rows x k) product's memory


@dataclass
class SphericalResult:
    """Outcome of one spherical k-means.

    Attributes:
        assignments: ``(N,)`` int64 centroid of each (local) point, from the final centroids.
        centroids: ``(k, d)`` unit-norm float32 centroids.
        objective: mean dot product of the points with their centroid, at each assignment
            step (``n_iter + 1`` values; never falls).
        n_empty: clusters with no point at the final assignment.
        n_split: empty clusters re-seeded by a split (``empty="split"`` only).
    """

    assignments: torch.Tensor
    centroids: torch.Tensor
    objective: list[float] = field(default_factory=list)
    n_empty: int = 0
    n_split: int = 0


def nearest_centroids(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best centroid (largest dot product) of every point and that dot product, in blocks of rows:
    ``(N, d), (k, d) -> (N,) int64, (N,)``."""
    labels = torch.empty(len(points), dtype=torch.int64, device=points.device)
    scores = torch.empty(len(points), dtype=points.dtype, device=points.device)
    for start in range(0, len(points), BLOCK_ROWS):
        best = (points[start:start + BLOCK_ROWS] @ centroids.T).max(dim=1)
        scores[start:start + BLOCK_ROWS], labels[start:start + BLOCK_ROWS] = best.values, best.indices
    return labels, scores


def _start(points: torch.Tensor, n_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """``n_clusters`` distinct points of the first process's shard, shared by all processes."""
    centroids = torch.zeros(n_clusters, points.shape[1], dtype=points.dtype, device=points.device)
    if distributed.rank() == 0:
        if len(points) < n_clusters:
            raise ValueError(f"spherical k-means: {n_clusters} clusters need at least as many points on the first "
                             f"process, which holds {len(points)}")
        rows = torch.randperm(len(points), generator=generator)[:n_clusters].to(points.device)
        centroids.copy_(points[rows])
    return distributed.all_reduce_sum(centroids)  # zeros elsewhere: the sum is a broadcast


def spherical_kmeans(points: torch.Tensor, n_clusters: int, n_iter: int = 10, seed: int = 0,
                     empty: str = "keep") -> SphericalResult:
    """Cluster unit-norm ``points`` ``(N, d)`` (this process's shard) into ``n_clusters``.

    Raises:
        ValueError: unknown ``empty`` policy, or fewer points than clusters.
    """
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"unknown empty-cluster policy {empty!r}; choose one of: {', '.join(EMPTY_POLICIES)}")
    generator = torch.Generator().manual_seed(seed)
    centroids = _start(points, n_clusters, generator)
    objective: list[float] = []
    n_split = 0
    total = float(distributed.all_reduce_sum(torch.tensor([float(len(points))], dtype=torch.float64))[0])
    for iteration in range(n_iter + 1):
        labels, scores = nearest_centroids(points, centroids)
        score_sum = distributed.all_reduce_sum(scores.sum().to(torch.float64).reshape(1))
        objective.append(float(score_sum[0]) / max(total, 1.0))
        if iteration == n_iter:
            break
        sums = torch.zeros_like(centroids, dtype=torch.float64)
        sums.index_add_(0, labels, points.to(torch.float64))
        counts = torch.bincount(labels, minlength=n_clusters).to(torch.float64)
        distributed.all_reduce_sum(sums)
        distributed.all_reduce_sum(counts)
        filled = counts > 0
        moved = torch.nn.functional.normalize(sums[filled], dim=1).to(centroids.dtype)
        centroids[filled] = moved
        if empty == "split" and not bool(filled.all()):
            n_split += _split_empty(centroids, counts, generator)
    counts = torch.bincount(labels, minlength=n_clusters)
    counts = distributed.all_reduce_sum(counts.to(torch.float64))
    return SphericalResult(labels, centroids, objective, int((counts == 0).sum()), n_split)


def _split_empty(centroids: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> int:
    """Re-seed every empty cluster next to a donor drawn in proportion to ``size - 1``; the
    donor's and the new centroid are pushed apart by ``SPLIT_EPS`` and re-normalised (the
    next assignment step shares the donor's points between them)."""
    sizes = counts.clone()
    n_split = 0
    dims = centroids.shape[1]
    sign = torch.ones(dims, dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1.0
    for cluster in torch.nonzero(sizes == 0).flatten().tolist():
        weights = (sizes - 1).clamp(min=0)
        if float(weights.sum()) <= 0:
            break
        donor = int(torch.multinomial(weights.cpu().float(), 1, generator=generator))
        base = centroids[donor].clone()
        centroids[cluster] = torch.nn.functional.normalize(base * (1 + SPLIT_EPS * sign), dim=0)
        centroids[donor] = torch.nn.functional.normalize(base * (1 - SPLIT_EPS * sign), dim=0)
        sizes[cluster] = sizes[donor] / 2
        sizes[donor] -= sizes[cluster]
        n_split += 1
    return n_split
