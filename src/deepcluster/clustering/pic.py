"""Power Iteration Clustering (PIC), DeepCluster's alternative to k-means.

As the DeepCluster paper and its reference code describe it (DEEPCLUSTER.md §2):

1. **Graph.** The ``n_neighbors`` (5) nearest neighbours of every point, weighted
   ``exp(-d^2 / sigma^2)`` (``d^2`` the squared Euclidean distance, ``sigma`` = 0.2), then
   symmetrised: ``W = A + A^T``.
2. **Power iterations.** From the uniform vector, ``n_iter`` (200) times
   ``v <- alpha W^T v + (1 - alpha) / N`` (``alpha`` = 0.001), L1-normalised each time as
   the reference does. ``v`` is a PageRank-like score that is high in dense regions.
3. **Hill climbing.** Every node points to the neighbour ``j`` with the largest
   ``W_ij (v_j - v_i)`` when that is positive, else to itself. ``v`` rises strictly along
   pointers, so following them ends at a root; each root is a cluster.
4. **Singletons.** A cluster of one point joins the cluster of its nearest neighbour that
   is not itself a singleton (sizes taken before any merge, as the reference does).

The number of clusters is found, not fixed. Every step is vectorised (``scipy.sparse``
for the graph and the iterations, numpy for pointers), and the k-NN graph comes from faiss
or torch (:mod:`deepcluster.clustering.knn`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
import torch

from deepcluster.clustering.kmeans import predict
from deepcluster.clustering.knn import knn_graph


@dataclass
class PICResult:
    """Outcome of PIC.

    Attributes:
        assignments: ``(N,)`` int64 cluster of every point, ``0 .. n_clusters - 1``.
        n_clusters: clusters found (after merging singletons).
        n_roots: clusters before merging singletons.
        n_merged: singletons merged into a neighbour's cluster.
        scores: ``(N,)`` float64 final power-iteration vector ``v`` (sums to 1).
        centroids: ``(n_clusters, d)`` float32 mean of each cluster's points, to place new
            points by :meth:`predict` (PIC itself has no centroids).
        seconds: wall time of each stage (``knn``, ``graph``, ``power_iteration``,
            ``hill_climb``, ``merge``).
    """

    assignments: np.ndarray
    n_clusters: int
    n_roots: int
    n_merged: int
    scores: np.ndarray
    centroids: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    def predict(self, points: np.ndarray, backend: str = "torch", device: str = "cpu") -> np.ndarray:
        """Cluster of new ``(n, d)`` points: that of the nearest cluster mean; ``(n,)`` int64."""
        return predict(points, self.centroids, backend=backend, device=device)


def cluster_means(points: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """``(n_clusters, d)`` float32 mean of the points of each cluster (float64 sums)."""
    labels_t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    sums = torch.zeros(n_clusters, points.shape[1], dtype=torch.float64)
    for start in range(0, len(points), 65536):
        sums.index_add_(0, labels_t[start:start + 65536], torch.from_numpy(points[start:start + 65536]).double())
    counts = torch.bincount(labels_t, minlength=n_clusters).clamp_(min=1)
    return (sums / counts[:, None]).float().numpy()


def similarity_graph(neighbors: np.ndarray, squared_distances: np.ndarray, sigma: float) -> scipy.sparse.csr_matrix:
    """Symmetrised Gaussian-weighted k-NN graph ``W = A + A^T``.

    Args:
        neighbors: ``(N, m)`` int64 neighbour indices (self excluded).
        squared_distances: ``(N, m)`` squared distances to them.
        sigma: kernel width; ``A_ij = exp(-d_ij^2 / sigma^2)``.

    Returns:
        ``(N, N)`` float64 CSR matrix with sorted indices.
    """
    n_points, n_neighbors = neighbors.shape
    weights = np.exp(-squared_distances.astype(np.float64) / sigma ** 2)
    indptr = np.arange(0, n_points * n_neighbors + 1, n_neighbors)
    adjacency = scipy.sparse.csr_matrix((weights.ravel(), neighbors.ravel(), indptr), shape=(n_points, n_points))
    graph = (adjacency + adjacency.T).tocsr()
    graph.sum_duplicates()
    graph.sort_indices()
    return graph


def power_iteration(graph: scipy.sparse.csr_matrix, alpha: float, n_iter: int) -> np.ndarray:
    """``n_iter`` steps of ``v <- alpha W^T v + (1 - alpha) / N``, L1-normalised, from
    ``v = 1 / N``; returns ``(N,)`` float64."""
    n_points = graph.shape[0]
    transposed = graph.T.tocsr()  # W is symmetric, but keep W^T as the method states it
    scores = np.full(n_points, 1.0 / n_points)
    for _ in range(n_iter):
        scores = alpha * (transposed @ scores) + (1.0 - alpha) / n_points
        scores /= scores.sum()
    return scores


def hill_climb(graph: scipy.sparse.csr_matrix, scores: np.ndarray) -> np.ndarray:
    """Root reached from every node by following the neighbour of largest
    ``W_ij (v_j - v_i) > 0`` (the first one in index order on ties); ``(N,)`` int64."""
    n_points = graph.shape[0]
    rows = np.repeat(np.arange(n_points), np.diff(graph.indptr))
    gain = graph.data * (scores[graph.indices] - scores[rows])
    pointers = np.arange(n_points)
    has_edges = np.diff(graph.indptr) > 0
    best = np.full(n_points, -np.inf)
    best[has_edges] = np.maximum.reduceat(gain, graph.indptr[:-1][has_edges])
    winners = np.flatnonzero((gain > 0) & (gain == best[rows]))
    winner_rows, first = np.unique(rows[winners], return_index=True)
    pointers[winner_rows] = graph.indices[winners[first]]
    # v rises strictly along pointers (no cycles): jump until every node sits on a root.
    while True:
        jumped = pointers[pointers]
        if np.array_equal(jumped, pointers):
            return pointers
        pointers = jumped


def merge_singletons(labels: np.ndarray, neighbors: np.ndarray) -> tuple[np.ndarray, int]:
    """Move every one-point cluster into the cluster of its nearest neighbour that is not a
    singleton (sizes before any move); a point whose neighbours are all singletons stays.

    Returns:
        ``(N,)`` labels (not yet renumbered) and the number of points moved.
    """
    sizes = np.bincount(labels)
    singletons = np.flatnonzero(sizes[labels] == 1)
    if len(singletons) == 0:
        return labels, 0
    candidates = sizes[labels[neighbors[singletons]]] > 1
    movable = candidates.any(1)
    first = candidates.argmax(1)
    targets = labels[neighbors[singletons[movable], first[movable]]]
    labels = labels.copy()
    labels[singletons[movable]] = targets
    return labels, int(movable.sum())


def _check_settings(points: np.ndarray, n_neighbors: int, sigma: float, alpha: float, n_iter: int) -> None:
    """Raise ``ValueError`` for points that are not ``(N, d)`` with ``N > n_neighbors``, or a
    setting out of its range."""
    if points.ndim != 2:
        raise ValueError(f"points must be a 2-d array (N, d), got shape {points.shape}")
    if len(points) < n_neighbors + 1:
        raise ValueError(f"PIC needs more points than n_neighbors ({n_neighbors}), got {len(points)}")
    if sigma <= 0 or n_neighbors < 1 or n_iter < 0 or not 0 < alpha < 1:
        raise ValueError(f"PIC needs sigma > 0, n_neighbors >= 1, n_iter >= 0 and 0 < alpha < 1; got sigma={sigma}, "
                         f"n_neighbors={n_neighbors}, n_iter={n_iter}, alpha={alpha}")


def pic(points: np.ndarray, n_neighbors: int = 5, sigma: float = 0.2, alpha: float = 0.001, n_iter: int = 200,
        merge_singleton_clusters: bool = True, knn_backend: str = "faiss", device: str = "cpu",
        exact_max_points: int = 50_000, seed: int = 0) -> PICResult:
    """Power Iteration Clustering of ``(N, d)`` points (preprocessed as for k-means:
    PCA-whitened and L2-normalised, which is what ``sigma`` = 0.2 is tuned for).

    Args:
        points: ``(N, d)`` float32.
        n_neighbors: neighbours per point in the graph (reference: 5).
        sigma: Gaussian kernel width (reference: 0.2).
        alpha: weight of the graph term in each power iteration (reference: 0.001).
        n_iter: power iterations (reference: 200).
        merge_singleton_clusters: merge one-point clusters into a neighbour's (reference).
        knn_backend: ``faiss`` or ``torch`` for the k-NN graph.
        device: torch device for the ``torch`` k-NN backend.
        exact_max_points: the faiss k-NN is exact up to this many points, approximate above.
        seed: seeds the approximate k-NN index.

    Returns:
        A :class:`PICResult`; ``n_clusters`` says how many clusters were found.

    Raises:
        ValueError: fewer than ``n_neighbors + 1`` points, or a non-positive setting.
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    _check_settings(points, n_neighbors, sigma, alpha, n_iter)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = now - clock
        clock = now

    neighbors, squared_distances = knn_graph(points, n_neighbors, knn_backend, device,
                                             exact_max_points=exact_max_points, seed=seed)
    lap("knn")
    graph = similarity_graph(neighbors, squared_distances, sigma)
    lap("graph")
    scores = power_iteration(graph, alpha, n_iter)
    lap("power_iteration")
    roots = hill_climb(graph, scores)
    _, labels = np.unique(roots, return_inverse=True)
    n_roots = int(labels.max()) + 1
    lap("hill_climb")
    n_merged = 0
    if merge_singleton_clusters:
        labels, n_merged = merge_singletons(labels, neighbors)
        _, labels = np.unique(labels, return_inverse=True)
    labels = labels.astype(np.int64)
    n_clusters = int(labels.max()) + 1
    centroids = cluster_means(points, labels, n_clusters)
    lap("merge")
    return PICResult(labels, n_clusters, n_roots, n_merged, scores, centroids, seconds)
