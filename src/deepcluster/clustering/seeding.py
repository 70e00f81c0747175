"""Starting centroids of k-means: drawn from the points, or the means of an earlier labelling.

Every draw depends only on the seed and on the global point set (the processes' rows in
rank order), never on how the rows are spread over processes.
"""

from __future__ import annotations

import numpy as np
import torch

from deepcluster.clustering.search import resolve_device
from deepcluster.clustering.shard import Shard, as_float32_tensor, as_shard

# ``random``: k distinct points drawn with numpy (faiss's and DeepCluster's start);
# ``randperm``: the first k of a torch.randperm of the points (SwAV's DeepCluster-v2 start);
# ``kmeans++``: D^2 sampling.
INITS = ("random", "kmeans++", "randperm")
# Rows per pass of k-means++ (bounds its temporary memory).
PASS_ROWS = 1 << 16


def init_centroids(points: np.ndarray | torch.Tensor, n_clusters: int, method: str, rng: np.random.Generator,
                   device: str = "cpu", shard: Shard | None = None,
                   generator: torch.Generator | None = None) -> np.ndarray:
    """Initial ``(k, d)`` float32 centroids.

    ``random``: ``k`` points at distinct indices, drawn uniformly by ``rng``. ``randperm``:
    the points at the first ``k`` indices of ``torch.randperm(N, generator=generator)``.
    ``kmeans++``: the first centroid uniformly, each next one with probability proportional
    to the squared distance to the nearest centroid already chosen (``k`` passes over the
    points; sequential by nature).

    Args:
        points: ``(N, d)`` points (this process's shard when ``shard`` spans processes).
        n_clusters: k.
        method: one of :data:`INITS`.
        rng: the run's numpy generator; the same draws on every process.
        device: where k-means++ computes distances (with torch, whatever the search backend).
        shard: this process's rows of the global set; default all of them.
        generator: the run's torch generator (``randperm``); default one seeded with 0.

    Raises:
        ValueError: unknown method.
    """
    if method not in INITS:
        raise ValueError(f"unknown k-means init {method!r}; choose one of: {', '.join(INITS)}")
    points_t = as_float32_tensor(points)
    shard = shard or Shard(0, len(points_t), len(points_t))
    if method == "random":
        chosen = rng.choice(shard.total, n_clusters, replace=False)
        return shard.gather_rows(points_t, chosen).cpu().numpy()
    if method == "randperm":
        generator = generator or torch.Generator().manual_seed(0)
        chosen = torch.randperm(shard.total, generator=generator)[:n_clusters].numpy()
        return shard.gather_rows(points_t, chosen).cpu().numpy()
    return _kmeans_plus_plus(points_t.to(resolve_device(device)), n_clusters, rng, shard)


def _draw_next(closest: torch.Tensor, rng: np.random.Generator, shard: Shard) -> int:
    """Global row of the next k-means++ centroid: drawn in proportion to ``closest``."""
    totals = shard.all_gather_floats(float(closest.sum(dtype=torch.float64)))
    grand_total = sum(totals)
    if grand_total <= 0:  # every point already coincides with a centroid
        return int(rng.integers(shard.total))
    target = rng.random() * grand_total
    owner = min(int(np.searchsorted(np.cumsum(totals), target, side="right")), len(totals) - 1)
    choice = -1
    if owner == shard.rank and len(closest) > 0:
        cumulative = torch.cumsum(closest.double(), 0)
        local_target = torch.tensor([target - sum(totals[:owner])], dtype=torch.float64, device=cumulative.device)
        index = int(torch.searchsorted(cumulative, local_target, right=True)[0])
        choice = shard.offset + min(index, len(closest) - 1)
    return max(shard.all_gather_ints(choice))


def _kmeans_plus_plus(points_t: torch.Tensor, n_clusters: int, rng: np.random.Generator,
                      shard: Shard) -> np.ndarray:
    """k-means++ seeds (see :func:`init_centroids`)."""
    squared_norms = (points_t * points_t).sum(1)
    centroids = torch.empty(n_clusters, points_t.shape[1], dtype=torch.float32, device=points_t.device)
    centroids[0] = shard.gather_rows(points_t, np.array([rng.integers(shard.total)]))[0]
    closest = torch.full((len(points_t),), float("inf"), device=points_t.device)
    for i in range(n_clusters):
        if i > 0:
            centroids[i] = shard.gather_rows(points_t, np.array([_draw_next(closest, rng, shard)]))[0]
        if i == n_clusters - 1:
            break
        center = centroids[i]
        for start in range(0, len(points_t), PASS_ROWS):
            block = points_t[start:start + PASS_ROWS]
            distance = squared_norms[start:start + PASS_ROWS] - 2.0 * (block @ center) + center.dot(center)
            distance.clamp_(min=0)
            torch.minimum(closest[start:start + PASS_ROWS], distance, out=closest[start:start + PASS_ROWS])
    return centroids.cpu().numpy()


def labelling_centroids(points: np.ndarray, labels: np.ndarray, n_clusters: int, seed: int,
                        shard: "bool | Shard" = False) -> np.ndarray:
    """``(k, d)`` float32 starting centroids from an earlier labelling: the mean of the points
    of each cluster (rows labelled ``-1`` are ignored), so cluster ``j`` stays (mostly) cluster
    ``j``; a cluster without a point starts at a point of the global set drawn at random
    (``numpy.random.default_rng(seed)``, distinct points).

    Args:
        points: ``(n, d)`` this process's rows.
        labels: ``(n,)`` int64 their earlier clusters.
        n_clusters: k.
        seed: seeds the draw for clusters without a point.
        shard: as :func:`deepcluster.clustering.kmeans.kmeans`'s: ``True`` sums over the
            default process group; every process gets the same centroids, equal to those
            of one process holding all rows (up to the order of float additions).
    """
    points = np.asarray(points)
    shard = as_shard(shard, len(points))
    usable = labels >= 0
    sums = np.zeros((n_clusters, points.shape[1] + 1), dtype=np.float64)
    np.add.at(sums[:, :-1], labels[usable], points[usable])
    sums[:, -1] = np.bincount(labels[usable], minlength=n_clusters)
    sums = shard.all_reduce_sum(torch.from_numpy(sums)).numpy()
    counts, sums = sums[:, -1].copy(), sums[:, :-1]
    empty = counts == 0
    chosen = np.random.default_rng(seed).choice(shard.total, int(empty.sum()), replace=False)
    picked = np.zeros((len(chosen), points.shape[1]), dtype=np.float64)
    mine = (chosen >= shard.offset) & (chosen < shard.offset + shard.size)
    picked[mine] = points[chosen[mine] - shard.offset]
    sums[empty] = shard.all_reduce_sum(torch.from_numpy(picked)).numpy()
    counts[empty] = 1
    return (sums / counts[:, None]).astype(np.float32)


__all__ = ["INITS", "init_centroids", "labelling_centroids"]
