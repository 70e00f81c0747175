"""Power Iteration Clustering and its k-NN graph (seeded, tiny, seconds)."""

import numpy as np
import pytest
import scipy.sparse

from deepcluster.clustering import knn_graph, l2_normalize, nmi, pic
from deepcluster.clustering.pic import hill_climb, merge_singletons, power_iteration, similarity_graph


def two_rings(n_per: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, 2 * n_per)
    radius = np.repeat([1.0, 2.0], n_per)
    points = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1) + 0.01 * rng.standard_normal((2 * n_per, 2))
    return points.astype(np.float32), np.repeat([0, 1], n_per)


def is_pure(truth: np.ndarray, assignments: np.ndarray) -> bool:
    """Every cluster holds points of one true group only."""
    return all(len(np.unique(truth[assignments == c])) == 1 for c in np.unique(assignments))


@pytest.mark.parametrize("knn_backend", ["faiss", "torch"])
def test_pic_never_mixes_two_rings_and_leaves_no_singleton(knn_backend):
    points, truth = two_rings()
    result = pic(points, knn_backend=knn_backend)
    assert is_pure(truth, result.assignments)
    assert result.n_clusters == len(np.unique(result.assignments)) >= 2
    assert np.bincount(result.assignments).min() >= 2
    assert result.scores.sum() == pytest.approx(1.0)


def test_pic_separates_two_blobs_on_the_unit_sphere():
    # Preprocessed DeepCluster features are unit vectors; sigma = 0.2 is tuned for them.
    rng = np.random.default_rng(1)
    directions = np.eye(2, 16) * 1.0
    points = l2_normalize(np.concatenate([d + 0.03 * rng.standard_normal((200, 16)) for d in directions]))
    truth = np.repeat([0, 1], 200)
    result = pic(points)
    assert is_pure(truth, result.assignments)
    assert nmi(truth, result.assignments) > 0.5  # PIC finds more, smaller clusters than 2


def test_faiss_and_torch_knn_graphs_agree_and_exclude_self():
    points = np.random.default_rng(2).standard_normal((300, 8)).astype(np.float32)
    faiss_nn, faiss_d = knn_graph(points, 5, "faiss")
    torch_nn, torch_d = knn_graph(points, 5, "torch")
    assert np.array_equal(faiss_nn, torch_nn)
    assert np.allclose(faiss_d, torch_d, rtol=1e-4, atol=1e-5)
    assert not (faiss_nn == np.arange(300)[:, None]).any()
    brute = ((points[:, None] - points[None]) ** 2).sum(-1)
    np.fill_diagonal(brute, np.inf)
    assert np.array_equal(faiss_nn, np.argsort(brute, 1, kind="stable")[:, :5])


def test_knn_graph_handles_exact_duplicates():
    points = np.repeat(np.eye(3, 4, dtype=np.float32), 4, axis=0)  # 3 points, 4 copies each
    neighbors, distances = knn_graph(points, 3)
    assert not (neighbors == np.arange(12)[:, None]).any()
    assert np.all(distances == 0)
    assert np.all(neighbors // 4 == np.arange(12)[:, None] // 4)  # copies of the same point


def test_approximate_knn_finds_most_true_neighbours_on_clustered_data():
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((50, 16)) * 4
    points = (centers[rng.integers(0, 50, 4000)] + rng.standard_normal((4000, 16))).astype(np.float32)
    exact, _ = knn_graph(points, 5, "faiss")
    approx, _ = knn_graph(points, 5, "faiss", exact_max_points=1000)
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approx, exact)])
    assert recall > 0.9


def test_hill_climb_follows_the_steepest_rise_to_the_roots():
    # A path 0-1-2-3-4 with a peak at 1 and one at 4.
    edges = [(0, 1), (1, 2), (2, 3), (3, 4)]
    rows, cols = zip(*(edges + [(b, a) for a, b in edges]))
    graph = scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(5, 5))
    scores = np.array([0.1, 0.3, 0.2, 0.25, 0.4])
    assert list(hill_climb(graph, scores)) == [1, 1, 1, 4, 4]


def test_power_iteration_is_a_distribution_that_favours_dense_nodes():
    neighbors = np.array([[1], [0], [1]])  # node 1 is everybody's neighbour
    graph = similarity_graph(neighbors, np.zeros((3, 1)), sigma=0.2)
    assert (graph != graph.T).nnz == 0  # symmetrised
    scores = power_iteration(graph, alpha=0.5, n_iter=50)
    assert scores.sum() == pytest.approx(1.0) and scores.argmax() == 1


def test_singletons_join_their_nearest_non_singleton_neighbour():
    labels = np.array([0, 0, 1, 2, 3])  # 1, 2, 3 are singletons
    neighbors = np.array([[1, 2], [0, 2], [3, 0], [2, 4], [2, 3]])
    merged, moved = merge_singletons(labels, neighbors)
    # point 2: neighbour 3 is a singleton, neighbour 0 is not -> cluster 0.
    # point 3: neighbours 2 and 4 are singletons -> stays. Point 4: likewise.
    assert moved == 1 and list(merged) == [0, 0, 0, 2, 3]


def test_pic_reports_the_number_of_clusters_it_found():
    rng = np.random.default_rng(4)
    points = l2_normalize(rng.standard_normal((500, 32)).astype(np.float32))
    result = pic(points, merge_singleton_clusters=False)
    assert result.n_clusters == result.n_roots == len(np.unique(result.assignments))
    assert result.n_merged == 0


def test_pic_rejects_bad_settings():
    with pytest.raises(ValueError, match="more points than n_neighbors"):
        pic(np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="sigma > 0"):
        pic(np.zeros((40, 2), dtype=np.float32), sigma=0.0)
    with pytest.raises(ValueError, match="k-NN backend 'annoy'"):
        knn_graph(np.zeros((40, 2), dtype=np.float32), 5, backend="annoy")


def test_new_points_go_to_the_cluster_of_their_nearest_mean():
    rng = np.random.default_rng(5)
    directions = np.eye(2, 16)
    points = l2_normalize(np.concatenate([d + 0.03 * rng.standard_normal((100, 16)) for d in directions]))
    result = pic(points)
    assert result.centroids.shape == (result.n_clusters, 16)
    for cluster in range(result.n_clusters):
        assert np.allclose(result.centroids[cluster], points[result.assignments == cluster].mean(0), atol=1e-5)
    fresh = l2_normalize(directions + 0.01 * rng.standard_normal((2, 16)))
    truth = np.repeat([0, 1], 100)
    for point, side in zip(fresh, [0, 1]):
        cluster = result.predict(point[None])[0]
        assert set(truth[result.assignments == cluster]) == {side}
