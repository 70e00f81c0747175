"""One k-means for both metrics: the cosine metric is spherical k-means, one empty-cluster
rule set serves both metrics, and the earlier spherical k-means is reproduced bit for bit."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepcluster.clustering import kmeans
from deepcluster.clustering.empty import EMPTY_RULES
from deepcluster.clustering.seeding import labelling_centroids
from deepcluster.methods.common import kmeans_partition
from deepcluster.methods.v2 import EMPTY_RULE, SPHERICAL

SPLIT_EPS = 1.0 / 1024.0


def unit_points(n: int, dim: int, seed: int, copies: bool = False) -> torch.Tensor:
    """Gaussian directions; with ``copies``, three of them repeated 40 times each, so that
    random starts land on copies and leave clusters empty."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(n, dim, generator=generator)
    if copies:
        points = torch.cat([points, points[:3].repeat(40, 1)])
        points = points[torch.randperm(len(points), generator=generator)]
    return F.normalize(points, dim=1)


def earlier_spherical(points: torch.Tensor, k: int, n_iter: int, seed: int, empty: str):
    """DeepCluster-v2's spherical k-means as the package had it before the two k-means were
    made one (one process), written out plainly: the reference the cosine metric must equal."""
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(len(points), generator=generator)[:k]].clone()
    objective, n_split = [], 0
    for iteration in range(n_iter + 1):
        best = (points @ centroids.T).max(dim=1)
        labels = best.indices
        objective.append(float(best.values.sum().to(torch.float64)) / len(points))
        if iteration == n_iter:
            break
        sums = torch.zeros_like(centroids, dtype=torch.float64).index_add_(0, labels, points.to(torch.float64))
        counts = torch.bincount(labels, minlength=k).to(torch.float64)
        filled = counts > 0
        centroids[filled] = F.normalize(sums[filled], dim=1).to(centroids.dtype)
        if empty == "split" and not bool(filled.all()):
            sizes = counts.clone()
            sign = torch.ones(points.shape[1])
            sign[1::2] = -1.0
            for cluster in torch.nonzero(sizes == 0).flatten().tolist():
                weights = (sizes - 1).clamp(min=0)
                if float(weights.sum()) <= 0:
                    break
                donor = int(torch.multinomial(weights.float(), 1, generator=generator))
                base = centroids[donor].clone()
                centroids[cluster] = F.normalize(base * (1 + SPLIT_EPS * sign), dim=0)
                centroids[donor] = F.normalize(base * (1 - SPLIT_EPS * sign), dim=0)
                sizes[cluster] = sizes[donor] / 2
                sizes[donor] -= sizes[cluster]
                n_split += 1
    return labels, centroids, objective, n_split


@pytest.mark.parametrize("empty", ["keep", "split"])
@pytest.mark.parametrize("copies", [False, True])
def test_cosine_metric_is_the_earlier_spherical_kmeans_bit_for_bit(empty, copies):
    points = unit_points(500, 8, seed=1, copies=copies)
    labels, centroids, objective, n_split = earlier_spherical(points, 40, 10, seed=3, empty=empty)
    everyone = np.arange(len(points))
    found, result = kmeans_partition(points, everyone, everyone, len(points), 40, 10, 3, "v2's k-means",
                                     empty=EMPTY_RULE[empty], **SPHERICAL)  # as methods.v2.cluster_bank runs it
    assignments = found.assignments
    assert np.array_equal(assignments, labels.numpy()) and np.array_equal(result.centroids, centroids.numpy())
    assert result.objective == objective and result.n_split == n_split
    if copies and empty == "split":
        assert n_split > 0  # the case did exercise the rule
    direct = kmeans(points, 40, 10, seed=3, backend="torch", init="randperm", metric="cosine",
                    empty={"keep": "keep", "split": "nudge"}[empty])
    assert np.array_equal(direct.assignments, labels.numpy()) and np.array_equal(direct.centroids, centroids.numpy())


def test_cosine_metric_is_the_l2_step_with_renormalised_centroids():
    """On unit points and unit centroids, the nearest centroid is the one of largest dot
    product, and the normalised mean is the normalised sum: a cosine iteration is an L2
    iteration followed by renormalising the centroids."""
    points = unit_points(600, 6, seed=2)
    start = points[:12].numpy().copy()
    cosine = kmeans(points, 12, n_iter=4, backend="torch", init=start, metric="cosine", empty="keep")
    centroids = start
    for _ in range(4):
        step = kmeans(points, 12, n_iter=1, backend="torch", init=centroids, empty="keep")
        centroids = F.normalize(torch.from_numpy(step.centroids), dim=1).numpy()
    final = kmeans(points, 12, n_iter=0, backend="torch", init=centroids, empty="keep")
    assert np.array_equal(final.assignments, cosine.assignments)
    np.testing.assert_allclose(centroids, cosine.centroids, atol=1e-6)
    np.testing.assert_allclose(2 - 2 * np.asarray(cosine.objective[-1]), final.objective[-1], atol=1e-5)


@pytest.mark.parametrize("empty", ["keep", "split"])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_cosine_kmeans_keeps_unit_centroids_and_its_objective_never_falls(empty, backend):
    points = unit_points(400, 8, seed=4, copies=True)
    for seed in range(4):
        result = kmeans(points, 30, n_iter=8, seed=seed, backend=backend, metric="cosine", empty=empty)
        np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)
        assert all(b >= a - 1e-6 for a, b in zip(result.objective, result.objective[1:])), result.objective
        assert len(result.objective) == 9


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_one_empty_cluster_rule_set_for_both_metrics(metric):
    points = unit_points(300, 8, seed=5, copies=True).numpy()
    outcomes = {empty: kmeans(points, 40, n_iter=10, seed=0, backend="torch", metric=metric, empty=empty)
                for empty in EMPTY_RULES}
    assert outcomes["keep"].n_split == 0 and outcomes["keep"].n_empty > 0  # starts on copies stay empty
    for empty in ("split", "nudge"):
        assert outcomes[empty].n_split > 0 and outcomes[empty].n_empty < outcomes["keep"].n_empty, empty
    assert outcomes["split"].n_empty == 0
    if metric == "cosine":
        for outcome in outcomes.values():
            np.testing.assert_allclose(np.linalg.norm(outcome.centroids, axis=1), 1.0, atol=1e-5)


def test_predict_uses_the_metric_the_centroids_were_fitted_with():
    points = unit_points(200, 4, seed=6)
    result = kmeans(points, 5, n_iter=3, backend="torch", metric="cosine")
    new = unit_points(50, 4, seed=7)
    assert np.array_equal(result.predict(new), (new @ torch.from_numpy(result.centroids).T).argmax(1).numpy())


def test_labelling_centroids_are_the_means_and_fill_clusters_without_points():
    rng = np.random.default_rng(0)
    points = rng.standard_normal((50, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 50)
    labels[:5] = -1  # ignored rows
    centroids = labelling_centroids(points, labels, 5, seed=1)
    for cluster in range(4):
        np.testing.assert_allclose(centroids[cluster], points[labels == cluster].mean(0), atol=1e-6)
    assert any(np.array_equal(centroids[4], row) for row in points)  # cluster 4 had no point


def test_bad_metric_or_empty_rule_is_one_clear_error():
    points = np.zeros((5, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="metric 'dot'; choose one of: l2, cosine"):
        kmeans(points, 2, metric="dot")
    with pytest.raises(ValueError, match="empty-cluster policy 'drop'; choose one of: split, nudge, keep"):
        kmeans(points, 2, empty="drop")
