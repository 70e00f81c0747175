"""k-means with the paper's explicit empty-cluster split.

Lloyd's algorithm: assign every point to its nearest centroid, split empty clusters,
move every centroid to the mean of its points; repeat. The nearest-centroid search is the
only expensive step (``2 N k d`` flops per iteration) and is delegated to a backend:
``faiss`` (faiss's exact flat index, CPU) or ``torch`` (chunked matrix products, on any
torch device). Everything else is shared, so every backend behaves the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

BACKENDS = ("faiss", "torch")
INITS = ("random", "kmeans++")

# Relative perturbation of a copied centroid, as faiss's split of empty clusters uses.
SPLIT_EPS = 1.0 / 1024.0


@dataclass
class KMeansResult:
    """Outcome of one k-means run.

    Attributes:
        assignments: ``(N,)`` int64 index of the nearest final centroid of each point.
        centroids: ``(k, d)`` float32 final centroids.
        objective: mean squared distance of the points to their centroid, one value per
            iteration (at its assignment step) and a last one for the final assignment.
        n_split: empty clusters re-seeded by splitting a non-empty one, over all iterations.
        n_empty: clusters that received no point in the final assignment.
    """

    assignments: np.ndarray
    centroids: np.ndarray
    objective: list[float] = field(default_factory=list)
    n_split: int = 0
    n_empty: int = 0


def nearest_centroid(points: np.ndarray, centroids: np.ndarray, backend: str = "faiss",
                     device: str = "cpu", chunk_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Index of, and squared distance to, the nearest centroid of every point.

    Args:
        points: ``(N, d)`` float32.
        centroids: ``(k, d)`` float32.
        backend: ``faiss`` or ``torch``.
        device: torch device for the ``torch`` backend.
        chunk_size: points per matrix product (bounds memory to ``chunk_size x k``).

    Returns:
        ``(N,)`` int64 labels and ``(N,)`` float32 squared distances.
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(centroids)
        distances, labels = index.search(points, 1)
        return labels[:, 0].astype(np.int64), np.maximum(distances[:, 0], 0.0)
    if backend == "torch":
        labels = np.empty(len(points), dtype=np.int64)
        distances = np.empty(len(points), dtype=np.float32)
        cents = torch.from_numpy(centroids).to(device)
        cent_norms = (cents * cents).sum(1)
        for start in range(0, len(points), chunk_size):
            chunk = torch.from_numpy(points[start:start + chunk_size]).to(device)
            # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the argmin needs only the last two.
            scores = torch.addmm(cent_norms[None, :], chunk, cents.t(), beta=1.0, alpha=-2.0)
            best, arg = scores.min(dim=1)
            best = best + (chunk * chunk).sum(1)
            labels[start:start + len(chunk)] = arg.cpu().numpy()
            distances[start:start + len(chunk)] = best.clamp_min(0).cpu().numpy()
        return labels, distances
    raise ValueError(f"unknown k-means backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


def init_centroids(points: np.ndarray, n_clusters: int, method: str, rng: np.random.Generator,
                   backend: str = "faiss", device: str = "cpu") -> np.ndarray:
    """Initial centroids: ``random`` distinct points, or ``kmeans++`` seeding (each new
    centroid drawn with probability proportional to the squared distance to the nearest
    centroid already chosen)."""
    n_points = len(points)
    if method == "random":
        return points[rng.choice(n_points, n_clusters, replace=False)].copy()
    if method != "kmeans++":
        raise ValueError(f"unknown k-means init {method!r}; choose one of: {', '.join(INITS)}")
    centroids = np.empty((n_clusters, points.shape[1]), dtype=np.float32)
    centroids[0] = points[rng.integers(n_points)]
    _, closest = nearest_centroid(points, centroids[:1], backend, device)
    for i in range(1, n_clusters):
        total = float(closest.sum())
        if total <= 0:  # every point already coincides with a centroid
            choice = rng.integers(n_points)
        else:
            choice = min(int(np.searchsorted(np.cumsum(closest, dtype=np.float64), rng.random() * total)), n_points - 1)
        centroids[i] = points[choice]
        _, distances = nearest_centroid(points, centroids[i:i + 1], backend, device)
        np.minimum(closest, distances, out=closest)
    return centroids


def split_empty_clusters(points: np.ndarray, labels: np.ndarray, centroids: np.ndarray,
                         rng: np.random.Generator) -> int:
    """Re-seed every empty cluster from a non-empty one, in place; returns how many.

    For each empty cluster, a donor is drawn among clusters with at least two points, with
    probability proportional to (size - 1); the donor's centroid is copied into the empty
    one with a small symmetric perturbation (+eps on alternate dimensions for one, -eps for
    the other), and the donor's points are divided between the two by nearest of the two
    centroids (by a random halving when that leaves one side empty, e.g. for duplicates).
    """
    n_clusters = len(centroids)
    counts = np.bincount(labels, minlength=n_clusters)
    empty = np.flatnonzero(counts == 0)
    n_split = 0
    signs = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    for target in empty:
        weights = np.maximum(counts - 1, 0).astype(np.float64)
        if weights.sum() <= 0:
            break  # every cluster holds at most one point: nothing can be split
        donor = int(rng.choice(n_clusters, p=weights / weights.sum()))
        base = centroids[donor].copy()
        centroids[target] = base * (1 + SPLIT_EPS * signs)
        centroids[donor] = base * (1 - SPLIT_EPS * signs)
        members = np.flatnonzero(labels == donor)
        own = points[members]
        to_target = ((own - centroids[target]) ** 2).sum(1) < ((own - centroids[donor]) ** 2).sum(1)
        if to_target.all() or not to_target.any():
            to_target = np.zeros(len(members), dtype=bool)
            to_target[rng.permutation(len(members))[: len(members) // 2]] = True
        labels[members[to_target]] = target
        counts[target] = int(to_target.sum())
        counts[donor] -= counts[target]
        n_split += 1
    return n_split


def update_centroids(points: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> None:
    """Move each non-empty cluster's centroid to the mean of its points, in place."""
    n_clusters, dim = centroids.shape
    sums = torch.zeros(n_clusters, dim, dtype=torch.float64)
    label_tensor = torch.from_numpy(labels)
    for start in range(0, len(points), 262144):  # float64 sums, bounded extra memory
        chunk = torch.from_numpy(points[start:start + 262144]).double()
        sums.index_add_(0, label_tensor[start:start + 262144], chunk)
    counts = np.bincount(labels, minlength=n_clusters)
    filled = counts > 0
    centroids[filled] = (sums.numpy()[filled] / counts[filled, None]).astype(np.float32)


def kmeans(points: np.ndarray, n_clusters: int, n_iter: int = 20, seed: int = 0,
           backend: str = "faiss", init: str = "random", device: str = "cpu") -> KMeansResult:
    """Cluster ``(N, d)`` points into ``n_clusters`` with Lloyd's algorithm.

    Runs exactly ``n_iter`` iterations (no early stop, as the reference), each: nearest
    centroid for every point, explicit split of empty clusters, centroid update. The
    returned labels come from a last nearest-centroid search with the final centroids.

    Args:
        points: ``(N, d)`` array, converted to float32 once.
        n_clusters: k, at most N.
        n_iter: Lloyd iterations.
        seed: seeds initialisation and splits; same seed, same result.
        backend: ``faiss`` or ``torch`` (nearest-centroid search).
        init: ``random`` or ``kmeans++``.
        device: torch device for the ``torch`` backend.

    Raises:
        ValueError: k < 1, k > N, or an unknown backend or init.
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    if points.ndim != 2:
        raise ValueError(f"points must be a 2-d array (N, d), got shape {points.shape}")
    if not 1 <= n_clusters <= len(points):
        raise ValueError(f"n_clusters must be between 1 and the number of points ({len(points)}), got {n_clusters}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    rng = np.random.default_rng(seed)
    centroids = init_centroids(points, n_clusters, init, rng, backend, device)
    objective: list[float] = []
    n_split = 0
    for _ in range(n_iter):
        labels, distances = nearest_centroid(points, centroids, backend, device)
        objective.append(float(distances.mean()))
        n_split += split_empty_clusters(points, labels, centroids, rng)
        update_centroids(points, labels, centroids)
    labels, distances = nearest_centroid(points, centroids, backend, device)
    objective.append(float(distances.mean()))
    n_empty = int((np.bincount(labels, minlength=n_clusters) == 0).sum())
    return KMeansResult(labels, centroids, objective, n_split, n_empty)
