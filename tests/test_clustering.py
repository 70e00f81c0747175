import numpy as np
import pytest

from deepcluster.clustering import ari, cluster_sizes, clustering_accuracy, fit_pca, kmeans, l2_normalize, nmi
from deepcluster.clustering.kmeans import split_empty_clusters


def blobs(n_per: int, centers: np.ndarray, spread: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    points = np.concatenate([c + spread * rng.standard_normal((n_per, centers.shape[1])) for c in centers])
    labels = np.repeat(np.arange(len(centers)), n_per)
    return points.astype(np.float32), labels


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_recovers_well_separated_blobs(backend):
    # k-means++ seeds one centroid per blob with near certainty on well-separated blobs;
    # random init often puts two in one blob (5 blobs: 5!/5^5 = 4% chance of one each)
    # and Lloyd cannot move a centroid across an empty gap, so it is tested on 2 blobs.
    centers = np.random.default_rng(1).standard_normal((5, 16)) * 10
    points, labels = blobs(60, centers, 0.3)
    result = kmeans(points, 5, n_iter=20, seed=3, backend=backend, init="kmeans++")
    assert nmi(labels, result.assignments) == pytest.approx(1.0, abs=1e-12)
    assert result.n_empty == 0
    assert len(result.objective) == 21


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_random_init_recovers_two_blobs(backend, seed):
    points, labels = blobs(60, np.array([[0.0] * 8, [10.0] * 8]), 0.5)
    result = kmeans(points, 2, n_iter=10, seed=seed, backend=backend, init="random")
    assert nmi(labels, result.assignments) == pytest.approx(1.0, abs=1e-12)


def test_kmeans_objective_never_rises():
    points, _ = blobs(100, np.random.default_rng(2).standard_normal((8, 4)), 1.0)
    result = kmeans(points, 8, n_iter=15, seed=0)
    assert all(b <= a + 1e-6 for a, b in zip(result.objective, result.objective[1:]))


def test_kmeans_is_deterministic_given_a_seed_and_backends_agree():
    points, _ = blobs(50, np.random.default_rng(4).standard_normal((6, 8)) * 3, 1.0)
    a = kmeans(points, 6, seed=7, backend="faiss")
    b = kmeans(points, 6, seed=7, backend="faiss")
    c = kmeans(points, 6, seed=7, backend="torch")
    assert np.array_equal(a.assignments, b.assignments)
    assert nmi(a.assignments, c.assignments) == pytest.approx(1.0, abs=1e-12)


def test_empty_cluster_split_fires_and_leaves_no_empty_cluster():
    points, _ = blobs(40, np.array([[0.0, 0.0], [10.0, 10.0]]), 0.5)
    labels = np.zeros(len(points), dtype=np.int64)  # everything in cluster 0
    labels[40:] = 1
    centroids = np.array([[0.0, 0.0], [10.0, 10.0], [99.0, 99.0], [-99.0, 99.0]], dtype=np.float32)
    n_split = split_empty_clusters(points, labels, centroids, np.random.default_rng(0))
    assert n_split == 2
    assert np.all(np.bincount(labels, minlength=4) > 0)
    # The re-seeded centroids are copies (up to the small perturbation) of a donor's.
    assert np.abs(centroids[2:]).max() < 11


def test_kmeans_with_far_initial_centroids_splits_and_ends_without_empty_clusters():
    # 4 blobs, k = 8: some initial centroids are bound to lose their points.
    points, _ = blobs(50, np.array([[0, 0], [0, 20], [20, 0], [20, 20]], dtype=np.float32), 1.0)
    result = kmeans(points, 8, n_iter=20, seed=0)
    assert result.n_empty == 0
    assert len(np.unique(result.assignments)) == 8


def test_ten_clusters_from_five_distinct_points_reports_splits():
    base = np.eye(5, 8, dtype=np.float32)
    points = np.repeat(base, 20, axis=0)
    result = kmeans(points, 10, n_iter=10, seed=0)
    assert result.n_split > 0
    assert nmi(np.repeat(np.arange(5), 20), result.assignments) > 0.99


def test_kmeans_rejects_more_clusters_than_points():
    with pytest.raises(ValueError, match="between 1 and the number of points"):
        kmeans(np.zeros((5, 2), dtype=np.float32), 6)


def test_whitening_gives_identity_covariance():
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((32, 32)) * np.linspace(0.1, 10, 32)
    features = (rng.standard_normal((4000, 32)) @ mixing + 5).astype(np.float32)
    pca = fit_pca(features, 16, whiten_power=-0.5)
    projected = pca.transform(features)
    covariance = np.cov(projected, rowvar=False, bias=True)
    assert np.allclose(covariance, np.eye(16), atol=1e-3)
    assert np.all(np.diff(pca.eigenvalues) <= 0)  # largest variance first


def test_pca_without_whitening_keeps_variance_and_l2_normalizes():
    rng = np.random.default_rng(1)
    features = rng.standard_normal((500, 10)).astype(np.float32) * np.arange(1, 11)
    pca = fit_pca(features, 3, whiten_power=0.0)
    variances = pca.transform(features).var(axis=0)
    assert np.allclose(variances, [100, 81, 64], rtol=0.2)
    points = fit_pca(features, 3).project(features)
    assert np.allclose(np.linalg.norm(points, axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.linalg.norm(l2_normalize(np.zeros((2, 3))), axis=1), 0.0)


def test_pca_clamps_dimensions_to_available_variance():
    features = np.random.default_rng(0).standard_normal((10, 64)).astype(np.float32)
    assert fit_pca(features, 256).n_components == 9


def test_pca_with_few_rows_through_the_gram_matrix_equals_the_covariance_eigenpairs():
    """At N <= D / 2 the eigenpairs come from the N x N Gram matrix; they must be the D x D
    covariance's: same variances, same whitened directions up to each one's sign."""
    rng = np.random.default_rng(3)
    features = (rng.standard_normal((40, 200)) * np.linspace(3, 0.1, 200)).astype(np.float32)
    features[7] = features[3]  # a duplicate row: one direction of variance fewer
    pca = fit_pca(features, 16)
    centred = features.astype(np.float64) - features.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred / len(features))
    values, vectors = values[::-1][:16], vectors[:, ::-1][:, :16]
    assert np.allclose(pca.eigenvalues, values, rtol=1e-4)
    signs = np.sign(np.sum(pca.projection * vectors, axis=0))
    assert np.allclose(pca.projection * signs, vectors * values ** -0.5, rtol=1e-3, atol=1e-4)
    whitened = pca.transform(features)
    assert np.allclose(np.cov(whitened, rowvar=False, bias=True), np.eye(16), atol=1e-3)
    assert fit_pca(features, 256).n_components == 39  # clamped to N - 1


def test_metrics_on_known_labellings():
    truth = np.array([0, 0, 1, 1, 2, 2])
    permuted = np.array([2, 2, 0, 0, 1, 1])
    assert nmi(truth, permuted) == pytest.approx(1.0)
    assert clustering_accuracy(truth, permuted) == pytest.approx(1.0)
    assert ari(truth, permuted) == pytest.approx(1.0)
    assert clustering_accuracy(truth, np.zeros(6, dtype=int)) == pytest.approx(2 / 6)
    # More clusters than classes: unmatched clusters count as wrong.
    assert clustering_accuracy(truth, np.arange(6)) == pytest.approx(3 / 6)
    sizes = cluster_sizes(np.array([0, 0, 0, 3, -1]), 5)
    assert sizes.n_nonempty == 2 and sizes.largest_share == pytest.approx(0.75)


def test_openblas_coretype_only_for_avx512_amd_family_26_and_later():
    from deepcluster._openblas import openblas_coretype

    zen5 = {"vendor_id": "AuthenticAMD", "cpu family": "26", "flags": "sse avx2 avx512f"}
    assert openblas_coretype(zen5) == "SkylakeX"
    assert openblas_coretype({**zen5, "cpu family": "25"}) is None
    assert openblas_coretype({**zen5, "flags": "sse avx2"}) is None
    assert openblas_coretype({**zen5, "vendor_id": "GenuineIntel"}) is None
    assert openblas_coretype({}) is None
