import dataclasses

import numpy as np
import pytest

from deepcluster.evaluation.clustering_scores import kmeans_clustering_scores, score_labelling


def test_a_permuted_labelling_scores_perfectly():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 6, 300)
    permutation = rng.permutation(6)
    scores = score_labelling(truth, permutation[truth] + 10)  # other ids, same partition
    assert scores.acc == pytest.approx(100.0)
    assert scores.nmi == pytest.approx(1.0)
    assert scores.ari == pytest.approx(1.0)


def test_acc_matches_clusters_one_to_one():
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    merged = np.zeros(8, dtype=int)  # one cluster: only one class can be matched
    assert score_labelling(truth, merged).acc == pytest.approx(50.0)
    swapped = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    assert score_labelling(truth, swapped).acc == pytest.approx(87.5)


def blobs(n_per: int, n_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(42).standard_normal((n_classes, 12)) * 6
    labels = np.repeat(np.arange(n_classes), n_per)
    return (centers[labels] + 0.3 * rng.standard_normal((len(labels), 12))).astype(np.float32), labels


@pytest.mark.parametrize("pca_dim", [0, 3])  # 3: the between-class subspace of 4 blobs
def test_kmeans_recovers_separated_classes_on_both_splits(pca_dim):
    train_x, train_y = blobs(40, 4, seed=0)
    val_x, val_y = blobs(10, 4, seed=1)
    result = kmeans_clustering_scores(train_x, train_y, val_x, val_y, pca_dim=pca_dim, seeds=(0, 1, 2))
    assert result.n_clusters == 4 and result.seeds == [0, 1, 2]
    assert result.pca_dim == pca_dim
    assert result.train.acc > 95 and result.val.acc > 95
    assert result.train.nmi > 0.9 and result.val.ari > 0.9
    assert len(result.per_seed) == 3
    assert result.train_std.acc == pytest.approx(np.std([s["train"]["acc"] for s in result.per_seed]), abs=1e-9)


def test_the_pca_whitens_only_when_asked_and_the_table_says_which():
    from deepcluster.evaluation.report import metric_rows

    x, y = blobs(20, 4, seed=0)
    plain = kmeans_clustering_scores(x, y, pca_dim=3, whiten_power=0.0, seeds=(0,))
    whitened = kmeans_clustering_scores(x, y, pca_dim=3, whiten_power=-0.5, seeds=(0,))
    none = kmeans_clustering_scores(x, y, pca_dim=0, whiten_power=-0.5, seeds=(0,))
    assert (plain.whiten_power, whitened.whiten_power, none.whiten_power) == (0.0, -0.5, 0.0)
    labels = {}
    for name, result in (("plain", plain), ("whitened", whitened), ("none", none)):
        rows = metric_rows({"clustering": {"fc": dataclasses.asdict(result)}})
        labels[name] = next(row.label for row in rows if row.key == "clustering/fc/train/acc")
    assert "PCA 3," in labels["plain"] and "PCA 3 whitened" in labels["whitened"] and "PCA off" in labels["none"]


def test_train_only_scores_and_input_checks():
    x, y = blobs(10, 3, seed=0)
    result = kmeans_clustering_scores(x, y, seeds=(0,))
    assert result.val is None and result.val_std is None
    with pytest.raises(ValueError, match="30 training rows but 29 labels"):
        kmeans_clustering_scores(x, y[:-1])
    with pytest.raises(ValueError, match="give both val_features and val_labels"):
        kmeans_clustering_scores(x, y, val_features=x)
    with pytest.raises(ValueError, match="at least one k-means seed"):
        kmeans_clustering_scores(x, y, seeds=())
