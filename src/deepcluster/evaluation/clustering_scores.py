"""How well k-means of the features recovers the classes: NMI, ARI and ACC.

The protocol of the papers that report DeepCluster on small benchmarks: k-means with
``k`` = number of classes, then

- NMI and ARI against the true classes (scikit-learn),
- ACC: accuracy under the best one-to-one matching of clusters to classes (scipy's
  Hungarian solver, ``linear_sum_assignment``).

Here k-means is fitted on the training split and the validation images are assigned to
the nearest centroid, so both splits get scores. Before k-means the features go through a
PCA (whitened when ``whiten_power`` is -0.5, as DeepCluster's own clustering; ``deepcluster
eval`` does not whiten by default) and L2 normalisation, or only the normalisation when
``pca_dim`` is 0. k-means is restarted with several
seeds (k-means++ starts); the report gives the mean and the spread over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from deepcluster.clustering import ari, clustering_accuracy, fit_pca, kmeans, l2_normalize, nearest_centroid, nmi


@dataclass
class ClusteringScores:
    """Agreement of one labelling with the truth: NMI, ARI (0-1) and ACC (%)."""

    nmi: float
    ari: float
    acc: float


def score_labelling(labels_true: np.ndarray, labels_pred: np.ndarray) -> ClusteringScores:
    """NMI, ARI and ACC of ``(N,)`` predicted cluster ids against ``(N,)`` true classes."""
    labels_true, labels_pred = np.asarray(labels_true), np.asarray(labels_pred)
    if labels_true.shape != labels_pred.shape or labels_true.ndim != 1 or len(labels_true) == 0:
        raise ValueError(f"need two non-empty labellings of the same length, "
                         f"got {labels_true.shape} and {labels_pred.shape}")
    return ClusteringScores(nmi(labels_true, labels_pred), ari(labels_true, labels_pred),
                            100.0 * clustering_accuracy(labels_true, labels_pred))


@dataclass
class ClusteringEvaluation:
    """k-means scores over several seeds.

    Attributes:
        train, val: mean scores over seeds on the training split (the fitted points) and
            on the validation split (nearest centroid).
        train_std, val_std: standard deviation over seeds.
        n_clusters: k.
        pca_dim: dimensions after the PCA (0: no PCA).
        seeds: the k-means seeds.
        per_seed: ``{"seed", "train": {...}, "val": {...}}`` for every seed.
        whiten_power: the PCA's eigenvalue exponent (-0.5 whitens; 0 without a PCA).
    """

    train: ClusteringScores
    val: ClusteringScores | None
    train_std: ClusteringScores
    val_std: ClusteringScores | None
    n_clusters: int
    pca_dim: int
    seeds: list[int]
    per_seed: list[dict] = field(default_factory=list)
    whiten_power: float = -0.5


def _mean_std(scores: list[ClusteringScores]) -> tuple[ClusteringScores, ClusteringScores]:
    table = np.array([[s.nmi, s.ari, s.acc] for s in scores], dtype=np.float64)
    mean, std = table.mean(axis=0), table.std(axis=0)
    return ClusteringScores(*map(float, mean)), ClusteringScores(*map(float, std))


def prepare_points(train_features: np.ndarray, val_features: np.ndarray | None, pca_dim: int,
                   whiten_power: float = -0.5) -> tuple[np.ndarray, np.ndarray | None, int]:
    """PCA-whiten (fitted on the training split) and L2-normalise both splits.

    Returns:
        ``(N, d)`` and ``(M, d)`` float32 unit rows, and ``d`` after PCA (0 when
        ``pca_dim`` is 0 and no PCA ran).
    """
    if pca_dim > 0:
        pca = fit_pca(train_features, pca_dim, whiten_power)
        train_points = pca.project(train_features)
        val_points = None if val_features is None else pca.project(val_features)
        return train_points, val_points, pca.n_components
    train_points = l2_normalize(np.array(train_features, dtype=np.float32))
    val_points = None if val_features is None else l2_normalize(np.array(val_features, dtype=np.float32))
    return train_points, val_points, 0


def kmeans_clustering_scores(train_features: np.ndarray, train_labels: np.ndarray,
                             val_features: np.ndarray | None = None, val_labels: np.ndarray | None = None,
                             n_clusters: int | None = None, pca_dim: int = 0, whiten_power: float = -0.5,
                             n_iter: int = 50, seeds: list[int] | tuple[int, ...] = (0, 1, 2, 3, 4),
                             backend: str = "faiss", init: str = "kmeans++") -> ClusteringEvaluation:
    """k-means the training features, score both splits against the classes.

    Args:
        train_features: ``(N, D)`` features k-means is fitted on.
        train_labels: ``(N,)`` true classes.
        val_features, val_labels: optional ``(M, D)`` features and ``(M,)`` classes,
            assigned to the nearest centroid.
        n_clusters: k; the number of distinct training classes when ``None``.
        pca_dim: PCA to this many dimensions before L2 normalisation; 0 for L2
            normalisation only.
        whiten_power: exponent of the eigenvalues in the PCA (-0.5 whitens, as DeepCluster
            clusters; 0 only rotates and reduces).
        n_iter: Lloyd iterations per run.
        seeds: one k-means run per seed.
        backend: ``faiss`` or ``torch`` (see ``deepcluster.clustering.kmeans``).
        init: ``kmeans++`` (default: with k as small as the number of classes, a random
            start often merges two classes for good) or ``random``.

    Raises:
        ValueError: no seed, mismatched lengths, or k larger than the training set.
    """
    train_labels = np.asarray(train_labels)
    if len(train_labels) != len(train_features):
        raise ValueError(f"{len(train_features)} training rows but {len(train_labels)} labels")
    if (val_features is None) != (val_labels is None):
        raise ValueError("give both val_features and val_labels, or neither")
    if val_labels is not None and len(val_labels) != len(val_features):
        raise ValueError(f"{len(val_features)} validation rows but {len(val_labels)} labels")
    if not seeds:
        raise ValueError("need at least one k-means seed")
    n_clusters = n_clusters or len(np.unique(train_labels))
    train_points, val_points, dim = prepare_points(train_features, val_features, pca_dim, whiten_power)
    per_seed: list[dict] = []
    train_scores: list[ClusteringScores] = []
    val_scores: list[ClusteringScores] = []
    for seed in seeds:
        result = kmeans(train_points, n_clusters, n_iter=n_iter, seed=int(seed), backend=backend, init=init)
        record: dict = {"seed": int(seed), "objective": result.objective[-1]}
        train_scores.append(score_labelling(train_labels, result.assignments))
        record["train"] = vars(train_scores[-1]).copy()
        if val_points is not None:
            assigned, _ = nearest_centroid(val_points, result.centroids, backend)
            val_scores.append(score_labelling(np.asarray(val_labels), assigned))
            record["val"] = vars(val_scores[-1]).copy()
        per_seed.append(record)
    train_mean, train_std = _mean_std(train_scores)
    val_mean, val_std = _mean_std(val_scores) if val_scores else (None, None)
    return ClusteringEvaluation(train_mean, val_mean, train_std, val_std, n_clusters, dim,
                                [int(s) for s in seeds], per_seed, float(whiten_power) if dim else 0.0)


def pca_width_scores(features: np.ndarray, labels: np.ndarray, n_clusters: int, widths: tuple[int, ...],
                     n_iter: int = 50, seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> dict:
    """Does the PCA in front of k-means, or its whitening, decide the accuracy? k-means of the
    training features (k = ``n_clusters``) after L2 normalisation alone and after a PCA of
    each width, whitened (-0.5, as DeepCluster clusters) and not (0).

    Returns:
        JSON-ready ``{"l2": scores, "widths": {"64": {"whitened": scores, "not": scores}, ...}}``
        (``ClusteringEvaluation`` as dicts; a width past the data's rank is clamped, its
        ``pca_dim`` says to what).
    """
    import dataclasses

    def scores(pca_dim: int, power: float) -> dict:
        return dataclasses.asdict(kmeans_clustering_scores(features, labels, None, None, n_clusters, pca_dim, power,
                                                           n_iter, seeds))

    return {"l2": scores(0, 0.0),
            "widths": {str(width): {"whitened": scores(width, -0.5), "not": scores(width, 0.0)} for width in widths}}


def describe_widths(result: dict) -> str:
    """``"L2 only 46.6%; PCA 64 whitened 64.9% / not 49.8%; ..."``: the train ACC of ``pca_width_scores``."""
    parts = [f"L2 only {result['l2']['train']['acc']:.1f}%"]
    for width, pair in result["widths"].items():
        parts.append(f"PCA {width} whitened {pair['whitened']['train']['acc']:.1f}% / not "
                     f"{pair['not']['train']['acc']:.1f}%")
    return "; ".join(parts)


__all__ = ["ClusteringEvaluation", "ClusteringScores", "describe_widths", "kmeans_clustering_scores",
           "pca_width_scores", "prepare_points", "score_labelling"]
