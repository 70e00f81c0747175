"""k-nearest-neighbour graphs of a point set (each point's neighbours among the others).

Backends:

- ``faiss``: exact (``IndexFlatL2``) up to ``exact_max_points`` points, approximate above
  (an inverted file, ``IndexIVFFlat``, with ``4 sqrt(N)`` lists and ``n_probe`` of them
  visited per query): 100,000 points in about 10 s on one core here, where the exhaustive
  ``N^2 d`` search takes about a minute.
- ``torch``: exact, blocked matrix products and ``topk`` on any torch device (``N^2 d``
  flops: meant for GPUs or a few tens of thousands of points on a CPU).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from deepcluster.clustering.kmeans import kmeans
from deepcluster.clustering.search import resolve_device

KNN_BACKENDS = ("faiss", "torch")


def _drop_self(neighbors: np.ndarray, distances: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from ``n_neighbors + 1`` results (the farthest result
    when the point itself was not returned, e.g. among exact duplicates)."""
    n_points = len(neighbors)
    is_self = neighbors == np.arange(n_points)[:, None]
    missing = ~is_self.any(1)
    is_self[missing, -1] = True
    first_self = is_self.argmax(1)
    keep = np.ones_like(is_self)
    keep[np.arange(n_points), first_self] = False
    return neighbors[keep].reshape(n_points, n_neighbors), distances[keep].reshape(n_points, n_neighbors)


def knn_graph(points: np.ndarray, n_neighbors: int, backend: str = "faiss", device: str = "cpu",
              exact_max_points: int = 50_000, n_probe: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_neighbors`` nearest other points of every point.

    Args:
        points: ``(N, d)`` float32.
        n_neighbors: neighbours per point, at most ``N - 1``.
        backend: ``faiss`` or ``torch``.
        device: torch device for the ``torch`` backend (faiss runs on the CPU here).
        exact_max_points: the faiss backend is exact up to this many points, approximate
            (inverted file) above.
        n_probe: inverted lists visited per query by the approximate search.
        seed: seeds the training of the inverted file's coarse quantizer.

    Returns:
        ``(N, n_neighbors)`` int64 neighbour indices, nearest first, and ``(N,
        n_neighbors)`` float32 squared Euclidean distances.

    Raises:
        ValueError: unknown backend, or ``n_neighbors`` not in ``[1, N - 1]``.
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    n_points, _ = points.shape
    if not 1 <= n_neighbors <= n_points - 1:
        raise ValueError(f"n_neighbors must be between 1 and the number of points minus one ({n_points - 1}), "
                         f"got {n_neighbors}")
    if backend == "faiss":
        index = _faiss_index(points, exact_max_points, n_probe, seed)
        index.add(points)
        distances, neighbors = index.search(points, n_neighbors + 1)
        distances = np.maximum(distances, 0.0)
    elif backend == "torch":
        neighbors, distances = _torch_knn(points, n_neighbors + 1, resolve_device(device))
    else:
        raise ValueError(f"unknown k-NN backend {backend!r}; choose one of: {', '.join(KNN_BACKENDS)}")
    # An approximate search can return fewer than asked for (-1): point those at self.
    missing = neighbors < 0
    if missing.any():
        neighbors = np.where(missing, np.arange(n_points)[:, None], neighbors)
        distances = np.where(missing, np.inf, distances).astype(np.float32)
    return _drop_self(neighbors.astype(np.int64), distances.astype(np.float32), n_neighbors)


def _faiss_index(points: np.ndarray, exact_max_points: int, n_probe: int, seed: int):
    """An empty faiss index for ``points``: exhaustive (``IndexFlatL2``) up to
    ``exact_max_points`` points, else an inverted file whose lists are already trained."""
    import faiss

    n_points, dim = points.shape
    if n_points <= exact_max_points:
        return faiss.IndexFlatL2(dim)
    n_lists = int(min(4 * math.sqrt(n_points), n_points // 39))
    # The coarse quantizer only has to spread the lists: our k-means (faster than
    # faiss's own training here, see docs/notebook/2026-11-23.md), 10 iterations on at most 64
    # points per list instead of faiss's 25 iterations on 256.
    rng = np.random.default_rng(seed)
    sample = points[np.sort(rng.choice(n_points, min(n_points, 64 * n_lists), replace=False))]
    quantizer = faiss.IndexFlatL2(dim)
    quantizer.add(kmeans(sample, n_lists, n_iter=10, seed=seed, backend="faiss").centroids)
    index = faiss.IndexIVFFlat(quantizer, dim, n_lists)
    index.is_trained = True
    index.nprobe = n_probe
    return index


def _torch_knn(points: np.ndarray, n_results: int, device: torch.device,
               budget: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``n_results`` nearest points (self included) by blocked ``addmm`` + ``topk``."""
    data = torch.from_numpy(points).to(device)
    half_norms = 0.5 * (data * data).sum(1)
    rows = max(1, min(len(points), budget // len(points)))
    neighbors = np.empty((len(points), n_results), dtype=np.int64)
    distances = np.empty((len(points), n_results), dtype=np.float32)
    for start in range(0, len(points), rows):
        block = data[start:start + rows]
        scores = torch.addmm(half_norms, block, data.t(), beta=1.0, alpha=-1.0)  # ||y||^2/2 - x.y
        values, indices = torch.topk(scores, n_results, dim=1, largest=False, sorted=True)
        squared = (2.0 * values + (block * block).sum(1, keepdim=True)).clamp_(min=0.0)
        neighbors[start:start + rows] = indices.cpu().numpy()
        distances[start:start + rows] = squared.cpu().numpy()
    return neighbors, distances
