import numpy as np
import pytest

from deepcluster.evaluation.retrieval import retrieval_scores


def test_separable_classes_give_perfect_retrieval():
    rng = np.random.default_rng(0)
    directions = np.eye(8, dtype=np.float32)[:3]
    gallery_y, query_y = np.repeat(np.arange(3), 20), np.repeat(np.arange(3), 5)
    gallery = directions[gallery_y] + 0.01 * rng.standard_normal((60, 8)).astype(np.float32)
    query = directions[query_y] + 0.01 * rng.standard_normal((15, 8)).astype(np.float32)
    result = retrieval_scores(gallery, gallery_y, query, query_y, ks=(1, 10, 100))
    assert result.mean_ap == pytest.approx(100.0)
    assert result.precision_at[1] == pytest.approx(100.0) and result.precision_at[10] == pytest.approx(100.0)
    # k is clipped to the gallery (60); 20 of 60 are relevant.
    assert result.precision_at[60] == pytest.approx(100.0 / 3)


def test_average_precision_of_a_known_ranking():
    # Gallery on the unit circle at decreasing similarity to the query (angle 0):
    # relevance along the ranking is 1, 0, 1, 0 -> AP = (1/1 + 2/3) / 2.
    angles = np.array([0.1, 0.2, 0.3, 0.4])
    gallery = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    gallery_y = np.array([1, 0, 1, 0])
    result = retrieval_scores(gallery, gallery_y, np.array([[1.0, 0.0]], np.float32), np.array([1]), ks=(1, 2))
    assert result.mean_ap == pytest.approx(100.0 * (1 + 2 / 3) / 2)
    assert result.precision_at == {1: pytest.approx(100.0), 2: pytest.approx(50.0)}


def test_chunking_and_queries_without_relevant_images():
    rng = np.random.default_rng(1)
    gallery, query = rng.standard_normal((50, 6)).astype(np.float32), rng.standard_normal((13, 6)).astype(np.float32)
    gallery_y, query_y = rng.integers(0, 4, 50), rng.integers(0, 5, 13)  # class 4 has no gallery image
    whole = retrieval_scores(gallery, gallery_y, query, query_y, max_block=1 << 20)
    tiny = retrieval_scores(gallery, gallery_y, query, query_y, max_block=7)  # one query per chunk
    assert whole.mean_ap == pytest.approx(tiny.mean_ap)
    assert whole.precision_at == pytest.approx(tiny.precision_at)
    assert whole.n_query == int((query_y < 4).sum())
