"""``head_init: centroids``: each new v1 head starts as a nearest-cluster-mean classifier
instead of the reference's N(0, 0.01) rows (an experiment; no recipe uses it)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from deepcluster import distributed
from deepcluster.features import Keep
from deepcluster.models.heads import ClassifierHead

if TYPE_CHECKING:
    from deepcluster.methods.v1 import ReducedFeatures

# head_init "centroids": rows whose features set the new head (enough for 20 per cluster),
# and the temperature of its logits (v2's).
HEAD_SAMPLE_MIN, HEAD_SAMPLE_PER_CLUSTER, HEAD_TEMPERATURE = 50_000, 20, 0.1


def head_sample(n_images: int, n_clusters: int, seed: int) -> np.ndarray:
    """``(N,)`` bool: the images whose features set a ``centroids`` head (all of a small set)."""
    size = min(n_images, max(HEAD_SAMPLE_MIN, HEAD_SAMPLE_PER_CLUSTER * n_clusters))
    mask = np.zeros(n_images, dtype=bool)
    mask[np.random.default_rng(seed).choice(n_images, size, replace=False) if size < n_images else slice(None)] = True
    return mask


@torch.no_grad()
def init_head_from_clusters(head: nn.Linear, features: np.ndarray, assignments: np.ndarray,
                            temperature: float = HEAD_TEMPERATURE, head_std: float = 0.01) -> None:
    """Start a new head as a nearest-cluster-mean classifier (``head_init: centroids``).

    The head reads ``h = relu(f)``. Row k becomes the direction from the mean of ``h`` to
    the mean of cluster k, scaled so the logits are about cos(h - mean, direction) / T
    (T = 0.1, v2's temperature), but at most 1 / T times the norm of a random row of std
    ``head_std`` (the model's); the bias subtracts the mean. So the first step already
    predicts the pseudo-labels and its gradient teaches the body instead of a random head
    (the reference starts from N(0, 0.01) and must learn the head first, a few hundred
    steps of every epoch, which is most of an epoch on a small set). Clusters without a
    sampled image keep their random row.

    Args:
        head: ``Linear(feature_dim, k)``, changed in place.
        features: ``(n, feature_dim)`` raw features (before the ReLU) of sampled images.
        assignments: ``(n,)`` their clusters in ``[0, k)``.
    """
    h = torch.relu(torch.from_numpy(features)).double()
    labels = torch.from_numpy(assignments).long()
    mean = h.mean(dim=0)
    scale = (h - mean).norm(dim=1).mean().clamp_min(1e-12)
    sums = torch.zeros(head.out_features, h.shape[1], dtype=torch.float64).index_add_(0, labels, h)
    counts = torch.bincount(labels, minlength=head.out_features)
    present = counts > 0
    direction = sums[present] / counts[present, None] - mean
    # Capped so tiny features (a narrow net under the reference init) do not get a huge head
    # whose gradient would throw the body off: at most 1 / T times a reference row's norm.
    norm = min(1.0 / (temperature * float(scale)), math.sqrt(h.shape[1]) * head_std / temperature)
    weight = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12) * norm
    head.weight[present] = weight.to(head.weight)
    head.bias[present] = -(weight @ mean).to(head.bias)


def with_rows(keep: Keep | None, rows: np.ndarray | None) -> Keep | None:
    """``keep`` with the ``(N,)`` bool ``rows`` kept as well (their body only if ``keep`` asks)."""
    if rows is None:
        return keep
    return Keep(rows if keep is None else rows | keep.rows, keep is not None and keep.body)


def centroids_head(head: ClassifierHead, reduced: ReducedFeatures, assignments: np.ndarray, rows: np.ndarray,
                   keep: Keep | None) -> None:
    """``head_init: centroids``: the new head from the raw features of the sampled ``rows``
    (gathered from every process); ``reduced.kept`` is cut back to what ``keep`` asked for."""
    sample = reduced.kept.select(rows)
    features, indices = distributed.gather_sorted(sample.features, sample.rows)
    decoded = reduced.decoded[indices]
    init_head_from_clusters(head.linear, features[decoded], assignments[rows][decoded], head_std=head.std)
    reduced.kept = None if keep is None else reduced.kept.select(keep.rows)


__all__ = ["centroids_head", "head_sample", "init_head_from_clusters", "with_rows"]
