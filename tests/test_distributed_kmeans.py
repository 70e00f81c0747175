"""k-means on a real gloo process group (a world of two) equals the run in a world of one."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepcluster.clustering import StreamingPCA, fit_pca, kmeans, l2_normalize
from deepcluster.clustering.seeding import labelling_centroids
from deepcluster.distributed import all_gather_rows

WORLD_SIZE = 2
# (backend, init, n_clusters): random seeds on the copies below make empty clusters, so
# splits (and their collective) are exercised; k-means++ seeds avoid copies.
CASES = [("torch", "random", 40), ("torch", "kmeans++", 12), ("faiss", "random", 40), ("faiss", "kmeans++", 12)]
# (empty rule, init) of the cosine metric on unit rows of the same data (copies included).
COSINE_CASES = [("keep", "randperm"), ("nudge", "randperm"), ("split", "random")]


def dataset() -> np.ndarray:
    """8 blobs plus 4 points copied 60 times each: random seeds land on copies of one
    point, the copies' clusters come out empty, and splits (with their ties) happen."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((8, 6)) * 5
    blobs = centers[rng.integers(0, 8, 460)] + rng.standard_normal((460, 6))
    copies = np.repeat(rng.standard_normal((4, 6)) * 5, 60, axis=0)
    return rng.permutation(np.concatenate([blobs, copies])).astype(np.float32)


def unit_dataset() -> np.ndarray:
    return l2_normalize(dataset())


def previous_labels() -> np.ndarray:
    """An earlier labelling of ``dataset()`` with unlabelled rows and clusters without a point."""
    labels = np.random.default_rng(3).integers(0, 30, len(dataset()))
    labels[::7] = -1
    return labels


def wide_features() -> np.ndarray:
    rng = np.random.default_rng(1)
    return (rng.standard_normal((300, 12)) * np.linspace(0.5, 4, 12) + 1).astype(np.float32)


def shard_bounds(n_rows: int) -> list[tuple[int, int]]:
    """Uneven contiguous shards (rank 0 holds more), to exercise the offsets."""
    cut = int(n_rows * 0.6)
    return [(0, cut), (cut, n_rows)]


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        points = dataset()
        start, stop = shard_bounds(len(points))[rank]
        results = {}
        for backend, init, n_clusters in CASES:
            result = kmeans(points[start:stop], n_clusters, n_iter=8, seed=5, backend=backend, init=init,
                            shard=True)
            results[(backend, init, n_clusters)] = result
        unit = unit_dataset()
        for empty, init in COSINE_CASES:
            results[("cosine", empty, init)] = kmeans(unit[start:stop], 40, n_iter=8, seed=5, backend="torch",
                                                      init=init, metric="cosine", empty=empty, shard=True)
        results["previous"] = labelling_centroids(points[start:stop], previous_labels()[start:stop], 34, seed=2,
                                                  shard=True)
        features = wide_features()
        start, stop = shard_bounds(len(features))[rank]
        reducer = StreamingPCA(stop - start, n_components=4, sample_size=50, gather_sample=all_gather_rows)
        for first in range(0, stop - start, 20):
            rows = np.arange(first, min(first + 20, stop - start))
            reducer.add(features[start + rows], rows)
        results["pca"] = reducer.finish()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(str(folder / "init"), str(folder)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_two_processes_give_the_single_process_result(distributed_results, case):
    backend, init, n_clusters = case
    points = dataset()
    single = kmeans(points, n_clusters, n_iter=8, seed=5, backend=backend, init=init)
    parts = [results[case] for results in distributed_results]
    assert np.array_equal(np.concatenate([p.assignments for p in parts]), single.assignments)
    for part in parts:
        assert np.allclose(part.centroids, single.centroids, atol=1e-5)
        assert np.allclose(part.objective, single.objective, rtol=1e-6)
        assert part.n_split == single.n_split and part.n_empty == single.n_empty
    if init == "random":
        assert single.n_split > 0  # the case did exercise the split


@pytest.mark.parametrize("case", COSINE_CASES, ids=["-".join(c) for c in COSINE_CASES])
@pytest.mark.slow
def test_cosine_in_two_processes_gives_the_single_process_result(distributed_results, case):
    empty, init = case
    single = kmeans(unit_dataset(), 40, n_iter=8, seed=5, backend="torch", init=init, metric="cosine", empty=empty)
    parts = [results[("cosine", *case)] for results in distributed_results]
    assert np.array_equal(np.concatenate([p.assignments for p in parts]), single.assignments)
    for part in parts:
        np.testing.assert_allclose(part.centroids, single.centroids, atol=1e-6)
        np.testing.assert_allclose(part.objective, single.objective, rtol=1e-6)
        assert part.n_split == single.n_split and part.n_empty == single.n_empty
    if empty != "keep":
        assert single.n_split > 0


@pytest.mark.slow
def test_labelling_centroids_in_two_processes_equal_the_single_process_ones(distributed_results):
    single = labelling_centroids(dataset(), previous_labels(), 34, seed=2)
    for results in distributed_results:
        np.testing.assert_allclose(results["previous"], single, atol=1e-6)


def test_shard_true_without_a_process_group_is_a_world_of_one():
    assert not dist.is_initialized()
    points = dataset()
    for metric in ("l2", "cosine"):
        a = kmeans(points, 10, n_iter=5, seed=1, backend="torch", metric=metric, shard=True)
        b = kmeans(points, 10, n_iter=5, seed=1, backend="torch", metric=metric)
        assert np.array_equal(a.assignments, b.assignments) and a.objective == b.objective


@pytest.mark.slow
def test_streaming_pca_fits_one_pca_on_every_process_sample(distributed_results):
    features = wide_features()
    bounds = shard_bounds(len(features))
    pooled_sample = np.concatenate([features[start:start + 50] for start, _ in bounds])
    reference = fit_pca(pooled_sample, 4)
    for (start, stop), results in zip(bounds, distributed_results):
        points, pca = results["pca"]
        signs = np.sign((pca.projection * reference.projection).sum(0))
        assert np.allclose(pca.projection * signs, reference.projection, atol=1e-4)
        assert np.allclose(points * signs, l2_normalize(reference.transform(features[start:stop])), atol=1e-4)
