"""Scores that compare two labellings of the same images.

- NMI: normalised mutual information (scikit-learn, arithmetic mean normalisation), 1
  when one labelling determines the other, 0 when independent. Used both against the
  true classes and between the assignments of consecutive epochs (stability).
- ACC: the share of images whose cluster maps to their class under the best one-to-one
  matching of clusters to classes (Hungarian algorithm); clusters left unmatched count as
  wrong.
- ARI: adjusted Rand index (scikit-learn), 0 for chance, 1 for identical partitions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def nmi(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Normalised mutual information of two ``(N,)`` labellings."""
    from sklearn.metrics import normalized_mutual_info_score  # imported late: 0.8 s at start-up

    return float(normalized_mutual_info_score(labels_a, labels_b))


def ari(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Adjusted Rand index of two ``(N,)`` labellings."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(labels_true, labels_pred))


def clustering_accuracy(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of predicted clusters to classes."""
    from scipy.optimize import linear_sum_assignment  # imported late: slow at start-up

    labels_true = np.asarray(labels_true)
    labels_pred = np.asarray(labels_pred)
    _, true_ids = np.unique(labels_true, return_inverse=True)
    _, pred_ids = np.unique(labels_pred, return_inverse=True)
    counts = np.zeros((pred_ids.max() + 1, true_ids.max() + 1), dtype=np.int64)
    np.add.at(counts, (pred_ids, true_ids), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(labels_true))


@dataclass
class ClusterSizes:
    """How the images spread over the clusters."""

    n_nonempty: int
    largest_share: float


def cluster_sizes(assignments: np.ndarray, n_clusters: int) -> ClusterSizes:
    """Number of non-empty clusters and the share of images in the largest one
    (negative ids, unusable images, are ignored)."""
    valid = assignments[assignments >= 0]
    counts = np.bincount(valid, minlength=n_clusters)
    return ClusterSizes(int((counts > 0).sum()), float(counts.max() / max(len(valid), 1)))
