"""k-means properties that every backend must share (seeded, tiny, seconds)."""

import numpy as np
import pytest
import torch

from deepcluster.clustering import kmeans, nearest_centroid, nmi, predict
from deepcluster.clustering.kmeans import init_centroids, split_empty_clusters
from deepcluster.clustering.search import (FaissSearch, TorchSearch, block_rows, onednn_usable, packed_onednn_usable,
                                           row_min)

BACKENDS = ["faiss", "torch"]


def blobs(n_per: int, centers: np.ndarray, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    points = np.concatenate([c + spread * rng.standard_normal((n_per, centers.shape[1])) for c in centers])
    return points.astype(np.float32), np.repeat(np.arange(len(centers)), n_per)


def uneven_blobs(seed: int = 0) -> np.ndarray:
    """20 blobs, a few large and many small: random init wastes centroids on the large ones."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, 6)) * 8
    sizes = [400] * 3 + [15] * 17
    return np.concatenate([c + rng.standard_normal((n, 6)) * 0.5 for c, n in zip(centers, sizes)]).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_backends_find_the_exact_nearest_centroid(backend):
    rng = np.random.default_rng(0)
    points = rng.standard_normal((1000, 12)).astype(np.float32)
    centroids = rng.standard_normal((37, 12)).astype(np.float32)
    labels, distances = nearest_centroid(points, centroids, backend)
    exact = ((points[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    assert np.array_equal(labels, exact.argmin(1))
    assert np.allclose(distances, exact.min(1), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not onednn_usable(), reason="PyTorch built without mkldnn")
def test_torch_search_onednn_and_addmm_products_agree():
    rng = np.random.default_rng(3)
    points = torch.from_numpy(rng.standard_normal((2000, 32)).astype(np.float32))
    centroids = torch.from_numpy(rng.standard_normal((300, 32)).astype(np.float32))
    results = []
    for gemm in ("addmm", "onednn"):
        search = TorchSearch(gemm=gemm)
        search.set_centroids(centroids)
        results.append(search.search(points))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown gemm 'blas'"):
        TorchSearch(gemm="blas")


def test_two_level_row_min_is_min_with_first_index_on_ties():
    rng = np.random.default_rng(5)
    scores = torch.from_numpy(rng.integers(0, 40, (500, 640)).astype(np.float32))  # many ties per row
    scores[7] = 3.0  # a whole row tied: index 0
    scores[9, 600:] = -1.0  # the minimum only in the last group
    values, indices = row_min(scores, 64)
    expected = scores.min(1)
    assert torch.equal(values, expected.values)
    assert torch.equal(indices, torch.from_numpy(scores.numpy().argmin(1)))  # numpy: first occurrence
    assert int(indices[7]) == 0 and int(indices[9]) == 600


@pytest.mark.parametrize("gemm", ["addmm", "onednn"])
def test_torch_search_with_padded_groups_is_exact_and_keeps_the_first_duplicate(gemm):
    if gemm == "onednn" and not onednn_usable():
        pytest.skip("PyTorch built without mkldnn")
    rng = np.random.default_rng(8)
    centroids = rng.standard_normal((300, 16)).astype(np.float32)  # 300 = 4 groups of 64 + 44, padded to 320
    centroids[250] = centroids[5]  # a duplicate: its points go to the first copy
    points = np.concatenate([centroids[[5, 299, 0]] + 0.01 * rng.standard_normal((3, 16)).astype(np.float32),
                             rng.standard_normal((997, 16)).astype(np.float32)])
    search = TorchSearch(gemm=gemm)
    search.set_centroids(torch.from_numpy(centroids))
    assert search.group == 64
    labels, distances = search.search(torch.from_numpy(points))
    exact = ((points[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    assert labels[:3].tolist() == [5, 299, 0]
    assert np.array_equal(labels.numpy(), exact.argmin(1))
    assert 250 not in labels.tolist()
    assert np.allclose(distances.numpy(), exact.min(1), rtol=1e-4, atol=1e-4)
    assert TorchSearch(gemm="onednn" if onednn_usable() else "addmm").packed == packed_onednn_usable()


@pytest.mark.parametrize("backend", BACKENDS)
def test_thread_count_changes_nothing_but_speed(backend):
    points, _ = blobs(3000, np.random.default_rng(11).standard_normal((6, 16)) * 3, 1.0)
    threads_before = torch.get_num_threads()
    one = kmeans(points, 24, n_iter=6, seed=2, backend=backend, n_threads=1)
    three = kmeans(points, 24, n_iter=6, seed=2, backend=backend, n_threads=3)
    assert np.array_equal(one.assignments, three.assignments)
    assert np.allclose(one.objective, three.objective, rtol=1e-6)
    assert torch.get_num_threads() == threads_before  # restored after the run


def test_torch_search_blocks_give_the_same_answer_as_one_block():
    rng = np.random.default_rng(1)
    points = torch.from_numpy(rng.standard_normal((1000, 8)).astype(np.float32))
    centroids = torch.from_numpy(rng.standard_normal((50, 8)).astype(np.float32))
    whole, blocked = TorchSearch(), TorchSearch(rows_per_block=97)
    whole.set_centroids(centroids)
    blocked.set_centroids(centroids)
    assert torch.equal(whole.search(points)[0], blocked.search(points)[0])
    assert 256 <= block_rows(10**6) <= block_rows(10) <= 65536


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_objective_never_rises_even_with_splits(backend, init):
    # 30 clusters on 6 blobs: centroids compete, some empty, splits fire.
    points, _ = blobs(80, np.random.default_rng(2).standard_normal((6, 4)) * 4, 1.0)
    result = kmeans(points, 30, n_iter=15, seed=0, backend=backend, init=init)
    assert len(result.objective) == 16
    assert all(b <= a * (1 + 1e-5) + 1e-7 for a, b in zip(result.objective, result.objective[1:]))
    assert result.objective[-1] < result.objective[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_plus_plus_beats_random_init_on_uneven_blobs(backend):
    points = uneven_blobs()
    seeds = range(5)
    random_init = [kmeans(points, 20, 10, seed=s, backend=backend, init="random").objective[-1] for s in seeds]
    plus_plus = [kmeans(points, 20, 10, seed=s, backend=backend, init="kmeans++").objective[-1] for s in seeds]
    assert np.mean(plus_plus) < 0.5 * np.mean(random_init)


def test_kmeans_plus_plus_seeds_are_distinct_points_spread_out():
    points = uneven_blobs()
    centroids = init_centroids(points, 20, "kmeans++", np.random.default_rng(0))
    assert len(np.unique(centroids, axis=0)) == 20
    assert all((points == c).all(1).any() for c in centroids)  # every seed is a data point


@pytest.mark.parametrize("backend", BACKENDS)
def test_ten_clusters_from_five_distinct_points_reports_splits(backend):
    points = np.repeat(np.eye(5, 8, dtype=np.float32), 20, axis=0)
    result = kmeans(points, 10, n_iter=5, seed=0, backend=backend)
    assert result.n_split > 0 and result.n_split == sum(result.splits_per_iteration)
    assert len(result.splits_per_iteration) == 5
    # Copies of one point cannot be told apart by a nearest-centroid rule: the final
    # assignment gives all copies to one centroid, and the rest is reported as empty.
    assert nmi(np.repeat(np.arange(5), 20), result.assignments) == pytest.approx(1.0)
    assert result.n_empty == 10 - len(np.unique(result.assignments))
    assert result.objective[-1] == pytest.approx(0.0, abs=1e-6)


def test_split_gives_the_donor_half_its_points_and_moves_both_to_their_means():
    points, _ = blobs(40, np.array([[0.0, 0.0], [10.0, 10.0]]), 0.5)
    labels = np.repeat(np.array([0, 1]), 40)
    centroids = np.array([[0.0, 0.0], [10.0, 10.0], [99.0, 99.0], [-99.0, 99.0]], dtype=np.float32)
    n_split = split_empty_clusters(points, labels, centroids, np.random.default_rng(0))
    assert n_split == 2
    counts = np.bincount(labels, minlength=4)
    assert np.all(counts > 0) and counts.sum() == 80
    for cluster in range(4):
        assert np.allclose(centroids[cluster], points[labels == cluster].mean(0), atol=1e-5)


def test_split_of_exact_duplicates_halves_them():
    points = np.ones((10, 3), dtype=np.float32)
    labels = np.zeros(10, dtype=np.int64)
    centroids = np.zeros((2, 3), dtype=np.float32)
    assert split_empty_clusters(points, labels, centroids, np.random.default_rng(0)) == 1
    assert 0 < np.bincount(labels, minlength=2)[1] < 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_result_other_seed_other_start(backend):
    points, _ = blobs(50, np.random.default_rng(4).standard_normal((6, 8)) * 3, 1.0)
    a = kmeans(points, 12, seed=7, backend=backend)
    b = kmeans(points, 12, seed=7, backend=backend)
    c = kmeans(points, 12, seed=8, backend=backend)
    assert np.array_equal(a.assignments, b.assignments) and np.array_equal(a.centroids, b.centroids)
    assert a.objective == b.objective
    assert a.objective[0] != c.objective[0]


def test_faiss_and_torch_backends_agree():
    points, _ = blobs(200, np.random.default_rng(5).standard_normal((8, 16)) * 3, 1.0)
    a = kmeans(points, 16, n_iter=10, seed=1, backend="faiss")
    b = kmeans(points, 16, n_iter=10, seed=1, backend="torch")
    assert (a.assignments == b.assignments).mean() > 0.999
    assert np.allclose(a.objective, b.objective, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_matches_training_labels_and_new_points_go_to_their_blob(backend):
    centers = np.random.default_rng(6).standard_normal((4, 10)) * 10
    points, labels = blobs(50, centers, 0.5)
    result = kmeans(points, 4, n_iter=10, seed=0, backend=backend, init="kmeans++")
    assert np.array_equal(result.predict(points, backend=backend), result.assignments)
    assert np.array_equal(predict(points, result.centroids), result.assignments)
    fresh, fresh_labels = blobs(10, centers, 0.5, seed=99)
    mapping = {int(t): int(result.assignments[labels == t][0]) for t in range(4)}
    assert np.array_equal(result.predict(fresh), [mapping[int(t)] for t in fresh_labels])


def test_accepts_float64_arrays_and_torch_tensors_with_the_same_result():
    points, _ = blobs(40, np.random.default_rng(7).standard_normal((3, 5)) * 5, 1.0)
    reference = kmeans(points, 3, seed=0, backend="torch")
    as_double = kmeans(points.astype(np.float64), 3, seed=0, backend="torch")
    as_tensor = kmeans(torch.from_numpy(points), 3, seed=0, backend="torch")
    assert np.array_equal(reference.assignments, as_double.assignments)
    assert np.array_equal(reference.assignments, as_tensor.assignments)


@pytest.mark.parametrize("backend", BACKENDS)
def test_as_many_clusters_as_points_and_zero_iterations(backend):
    points = np.random.default_rng(8).standard_normal((12, 3)).astype(np.float32)
    every = kmeans(points, 12, n_iter=3, seed=0, backend=backend)
    assert sorted(every.assignments) == list(range(12)) and every.objective[-1] == pytest.approx(0, abs=1e-6)
    start = kmeans(points, 4, n_iter=0, seed=0, backend=backend)
    assert len(start.objective) == 1 and start.n_split == 0


def test_errors_name_the_setting_and_the_allowed_values():
    points = np.zeros((5, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="backend 'sklearn'; choose one of: faiss, torch"):
        kmeans(points, 2, backend="sklearn")
    with pytest.raises(ValueError, match="init 'forgy'; choose one of: random, kmeans\\+\\+"):
        kmeans(points, 2, init="forgy")
    with pytest.raises(ValueError, match="between 1 and the number of points"):
        kmeans(points, 6)
    with pytest.raises(ValueError, match="2-d array"):
        kmeans(np.zeros(5), 2)
    with pytest.raises(ValueError, match="dimensions"):
        nearest_centroid(np.zeros((3, 2)), np.zeros((2, 3)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
def test_a_gpu_asked_for_without_one_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        kmeans(np.zeros((5, 2), dtype=np.float32), 2, backend="torch", device="cuda")
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        FaissSearch("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_backend_on_gpu_matches_cpu():
    points, _ = blobs(300, np.random.default_rng(9).standard_normal((10, 32)) * 3, 1.0)
    cpu = kmeans(points, 20, n_iter=10, seed=0, backend="torch", device="cpu")
    gpu = kmeans(points, 20, n_iter=10, seed=0, backend="torch", device="cuda")
    assert (cpu.assignments == gpu.assignments).mean() > 0.99
    assert np.allclose(cpu.objective, gpu.objective, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_faiss_backend_on_gpu_matches_cpu_when_faiss_has_gpu_support():
    from deepcluster.clustering.search import faiss_has_gpu

    if not faiss_has_gpu():
        pytest.skip("the installed faiss is a CPU build")
    points, _ = blobs(300, np.random.default_rng(9).standard_normal((10, 32)) * 3, 1.0)
    cpu = kmeans(points, 20, n_iter=10, seed=0, backend="faiss", device="cpu")
    gpu = kmeans(points, 20, n_iter=10, seed=0, backend="faiss", device="cuda")
    assert (cpu.assignments == gpu.assignments).mean() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_starting_centroids_are_used_as_is(backend):
    points, _ = blobs(30, np.random.default_rng(10).standard_normal((3, 4)) * 5, 0.5)
    start = points[[0, 30, 60]]
    result = kmeans(points, 3, n_iter=0, backend=backend, init=start)
    assert np.array_equal(result.centroids, start)
    with pytest.raises(ValueError, match="init centroids must have shape"):
        kmeans(points, 4, backend=backend, init=start)
