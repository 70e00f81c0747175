"""``kmeans_init: previous``: this epoch's k-means starts from last epoch's clusters (the
mean of this epoch's points under last epoch's assignments), so cluster k stays (mostly)
cluster k and a kept head still means something."""

from __future__ import annotations

import numpy as np
import torch

from deepcluster import distributed


def previous_centroids(points: np.ndarray, previous: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """``(k, d)`` starting centroids for ``kmeans_init: previous``: the mean of this epoch's
    points under last epoch's clustering, so cluster k stays (mostly) cluster k; a cluster
    without a usable point starts at a random point."""
    usable = previous >= 0
    sums = np.zeros((n_clusters, points.shape[1]), dtype=np.float64)
    np.add.at(sums, previous[usable], points[usable])
    counts = np.bincount(previous[usable], minlength=n_clusters)
    empty = counts == 0
    sums[empty] = points[np.random.default_rng(seed).choice(len(points), int(empty.sum()), replace=False)]
    counts[empty] = 1
    return (sums / counts[:, None]).astype(np.float32)


def sharded_previous_centroids(points: np.ndarray, previous: np.ndarray, n_clusters: int,
                               seed: int) -> np.ndarray:
    """``previous_centroids`` with the usable points spread over processes in rank order
    (``points``, ``previous``: this process's): the sums and counts are all-reduced, and a
    cluster without a point starts at the same random point of the global set as in one
    process."""
    usable = previous >= 0
    sums = np.zeros((n_clusters, points.shape[1] + 1), dtype=np.float64)
    np.add.at(sums[:, :-1], previous[usable], points[usable])
    sums[:, -1] = np.bincount(previous[usable], minlength=n_clusters)
    sums = distributed.all_reduce_sum(torch.from_numpy(sums)).numpy()
    counts = sums[:, -1].copy()
    sums = sums[:, :-1]
    empty = counts == 0
    sizes = distributed.all_gather_ints(len(points))
    offset = sum(sizes[:distributed.rank()])
    chosen = np.random.default_rng(seed).choice(sum(sizes), int(empty.sum()), replace=False)
    picked = np.zeros((len(chosen), points.shape[1]), dtype=np.float64)
    mine = (chosen >= offset) & (chosen < offset + len(points))
    picked[mine] = points[chosen[mine] - offset]
    sums[empty] = distributed.all_reduce_sum(torch.from_numpy(picked)).numpy()
    counts[empty] = 1
    return (sums / counts[:, None]).astype(np.float32)


__all__ = ["previous_centroids", "sharded_previous_centroids"]
