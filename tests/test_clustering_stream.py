"""Bounded-memory preprocessing: PCA fitted on a sample, features projected chunk by chunk."""

import numpy as np
import pytest

from deepcluster.clustering import StreamingPCA, fit_pca, l2_normalize


def correlated_features(n_rows: int, dim: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((dim, dim)) * np.linspace(0.2, 5, dim)
    return (rng.standard_normal((n_rows, dim)) @ mixing + 3).astype(np.float32)


def feed(reducer: StreamingPCA, features: np.ndarray, order: np.ndarray, chunk: int) -> None:
    for start in range(0, len(order), chunk):
        rows = order[start:start + chunk]
        reducer.add(features[rows], rows)


def test_sample_as_large_as_the_data_is_exactly_the_full_fit():
    features = correlated_features(500)
    order = np.random.default_rng(1).permutation(500)
    reducer = StreamingPCA(500, n_components=8, sample_size=1000)
    feed(reducer, features, order, chunk=64)
    points, pca = reducer.finish()
    reference = fit_pca(features, 8)
    # Same covariance up to the order of the rows: same projection up to sign.
    signs = np.sign((pca.projection * reference.projection).sum(0))
    assert np.allclose(pca.projection * signs, reference.projection, atol=1e-4)
    assert np.allclose(points * signs, l2_normalize(reference.transform(features)), atol=1e-4)
    assert reducer.seen.all()


def test_rows_land_at_their_index_whatever_the_order_and_chunking():
    features = correlated_features(700)
    order = np.random.default_rng(2).permutation(700)
    reducer = StreamingPCA(700, n_components=6, sample_size=250)  # fitted mid-chunk
    feed(reducer, features, order, chunk=100)
    points, pca = reducer.finish()
    assert np.allclose(points, l2_normalize(pca.transform(features)), atol=1e-5)
    assert np.allclose(np.linalg.norm(points, axis=1), 1.0, atol=1e-5)


def test_pca_on_a_sample_is_close_to_the_pca_on_everything():
    rng = np.random.default_rng(3)
    rotation = np.linalg.qr(rng.standard_normal((24, 24)))[0]
    scales = np.array([10, 7, 5, 3.5] + [1.0] * 20)  # 4 strong directions, then noise
    features = ((rng.standard_normal((20000, 24)) * scales) @ rotation + 3).astype(np.float32)
    full = fit_pca(features, 4)
    sampled = fit_pca(features, 4, max_samples=4000, seed=0)
    # Compare the spanned subspaces (directions of close variance may rotate inside them):
    # the cosines of the principal angles between them are the singular values below.
    full_basis = np.linalg.qr(full.projection)[0]
    sampled_basis = np.linalg.qr(sampled.projection)[0]
    cosines = np.linalg.svd(full_basis.T @ sampled_basis, compute_uv=False)
    assert np.all(cosines > 0.99)
    assert np.allclose(sampled.eigenvalues, full.eigenvalues, rtol=0.1)


def test_rows_never_fed_stay_zero_and_are_reported():
    features = correlated_features(100)
    reducer = StreamingPCA(120, n_components=4, sample_size=50)
    reducer.add(features, np.arange(100))
    points, _ = reducer.finish()
    assert not reducer.seen[100:].any() and np.all(points[100:] == 0)


def test_streaming_errors_are_actionable():
    reducer = StreamingPCA(10, n_components=2, sample_size=4)
    reducer.add(np.ones((2, 3), dtype=np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="fed twice"):
        reducer.add(np.ones((1, 3), dtype=np.float32), np.array([1]))
    with pytest.raises(ValueError, match="row indices must be in"):
        reducer.add(np.ones((1, 3), dtype=np.float32), np.array([10]))
    with pytest.raises(ValueError, match="one row index each"):
        reducer.add(np.ones((2, 3), dtype=np.float32), np.array([5]))
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        StreamingPCA(10, sample_size=4).finish()
    with pytest.raises(ValueError, match="sample_size must be at least 2"):
        StreamingPCA(10, sample_size=1)
