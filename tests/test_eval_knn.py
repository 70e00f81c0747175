import numpy as np
import pytest
import torch

from deepcluster.evaluation.knn import block_sizes, knn_classify, knn_scores, nearest_neighbors


def separable(n_per_class: int, n_classes: int, dim: int = 16, seed: int = 0, spread: float = 0.05):
    """Points near orthogonal class directions: trivially separable by cosine similarity."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    directions = np.eye(dim, dtype=np.float32)[:n_classes] * 3.0
    points = directions[labels] + spread * rng.standard_normal((len(labels), dim)).astype(np.float32)
    return points, labels


def test_knn_is_perfect_on_separable_features():
    train, train_y = separable(30, 4, seed=0)
    query, query_y = separable(10, 4, seed=1)
    result = knn_classify(train, train_y, query, query_y, n_classes=4)
    assert result.top1 == 100.0 and result.top5 == 100.0
    assert (result.k, result.n_train, result.n_query) == (20, 120, 40)


def test_k_larger_than_the_training_set_uses_every_image():
    train, train_y = separable(3, 2, seed=0)  # 6 images, k = 20
    query, query_y = separable(4, 2, seed=1)
    result = knn_classify(train, train_y, query, query_y, n_classes=2, k=20)
    assert result.k == 6 and result.top1 == 100.0
    sims, index = nearest_neighbors(train, query, k=20)
    assert sims.shape == (8, 6) and sorted(index[0].tolist()) == list(range(6))


def test_chunking_does_not_change_the_neighbours_or_votes():
    rng = np.random.default_rng(3)
    train = rng.standard_normal((257, 8)).astype(np.float32)
    train_y = rng.integers(0, 5, 257)
    query = rng.standard_normal((33, 8)).astype(np.float32)
    whole = knn_scores(train, train_y, query, 5, k=7, max_block=1 << 24)
    tiny = knn_scores(train, train_y, query, 5, k=7, max_block=50)  # many query and train chunks
    assert torch.allclose(whole, tiny, rtol=1e-5)
    sims_a, idx_a = nearest_neighbors(train, query, 7, max_block=1 << 24)
    sims_b, idx_b = nearest_neighbors(train, query, 7, max_block=50)
    assert torch.equal(idx_a, idx_b) and torch.allclose(sims_a, sims_b)


def test_neighbours_are_the_most_cosine_similar_rows():
    train = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], dtype=np.float32)
    sims, index = nearest_neighbors(train, np.array([[2.0, 0.1]], dtype=np.float32), k=3)
    assert index[0].tolist() == [0, 2, 1]
    assert sims[0, 0] == pytest.approx(2.0 / np.hypot(2.0, 0.1))


def test_votes_are_weighted_by_temperature():
    # Two neighbours of class 0 slightly less similar than one of class 1: with a low
    # temperature the single closest neighbour wins, with a high one the majority does.
    train = np.array([[1.0, 0.0], [0.9, 0.436], [0.9, -0.436]], dtype=np.float32)
    labels = np.array([1, 0, 0])
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    assert int(knn_scores(train, labels, query, 2, k=3, temperature=0.01).argmax()) == 1
    assert int(knn_scores(train, labels, query, 2, k=3, temperature=10.0).argmax()) == 0


@pytest.mark.parametrize("n_query, n_train", [(10, 10), (50, 10), (10_000, 50_000), (1_000, 5_000_000)])
def test_blocks_are_sized_by_memory_not_by_a_fixed_count(n_query, n_train):
    budget = 1 << 20
    query_chunk, train_chunk = block_sizes(n_query, n_train, budget)
    assert 1 <= query_chunk <= n_query and 1 <= train_chunk <= n_train
    assert query_chunk * train_chunk <= max(budget, 64)
    if n_query * n_train <= budget:
        assert (query_chunk, train_chunk) == (n_query, n_train)  # small sets: one block


def test_bad_arguments_raise():
    train, train_y = separable(2, 2)
    with pytest.raises(ValueError, match="temperature must be positive"):
        knn_scores(train, train_y, train, 2, temperature=0.0)
    with pytest.raises(ValueError, match="at least one training image"):
        nearest_neighbors(train[:0], train, k=3)
