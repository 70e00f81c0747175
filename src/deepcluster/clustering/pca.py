"""PCA with whitening, then L2 normalisation: how DeepCluster prepares features.

The reference fits faiss's ``PCAMatrix(d_in, 256, eigen_power=-0.5)`` on all features
anew each epoch and L2-normalises the rows. Whitening (power -0.5) gives every kept
direction unit variance, so k-means is not driven by the few directions of largest
variance alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


@dataclass
class PCA:
    """A fitted projection ``x -> (x - mean) @ projection``.

    Attributes:
        mean: ``(D,)`` mean of the fitting features.
        projection: ``(D, d)`` eigenvectors (largest eigenvalue first), each column
            scaled by its eigenvalue raised to ``whiten_power``.
        eigenvalues: ``(d,)`` variances along the kept directions.
        whiten_power: -0.5 whitens, 0 only rotates and reduces.
    """

    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray
    whiten_power: float

    @property
    def n_components(self) -> int:
        return self.projection.shape[1]

    def transform(self, features: np.ndarray, chunk_size: int = 65536) -> np.ndarray:
        """Project ``(N, D)`` features to ``(N, d)`` float32, ``chunk_size`` rows at a time."""
        out = np.empty((len(features), self.n_components), dtype=np.float32)
        mean = self.mean.astype(np.float32)
        projection = self.projection.astype(np.float32)
        for start in range(0, len(features), chunk_size):
            chunk = np.asarray(features[start:start + chunk_size], dtype=np.float32)
            out[start:start + chunk_size] = (chunk - mean) @ projection
        return out


def fit_pca(features: np.ndarray, n_components: int, whiten_power: float = -0.5,
            chunk_size: int = 65536) -> PCA:
    """Fit PCA on ``(N, D)`` features.

    The covariance is accumulated in float64 over row chunks (memory ``D x D`` plus one
    chunk), and only the ``n_components`` leading eigenpairs are computed.

    Args:
        features: ``(N, D)`` array, any float dtype.
        n_components: dimensions kept; clamped to ``min(D, N - 1)``, the largest number of
            directions with non-zero variance.
        whiten_power: exponent applied to the eigenvalues (-0.5 whitens).

    Raises:
        ValueError: fewer than 2 rows.
    """
    n_rows, dim = features.shape
    if n_rows < 2:
        raise ValueError("PCA needs at least 2 feature vectors")
    n_components = max(1, min(n_components, dim, n_rows - 1))
    mean = np.zeros(dim, dtype=np.float64)
    for start in range(0, n_rows, chunk_size):
        mean += np.asarray(features[start:start + chunk_size], dtype=np.float64).sum(axis=0)
    mean /= n_rows
    covariance = np.zeros((dim, dim), dtype=np.float64)
    mean32 = mean.astype(np.float32)
    for start in range(0, n_rows, chunk_size):
        chunk = np.asarray(features[start:start + chunk_size], dtype=np.float32) - mean32
        covariance += (chunk.T @ chunk).astype(np.float64)  # float32 GEMM, float64 sum
    covariance /= n_rows
    eigenvalues, eigenvectors = scipy.linalg.eigh(covariance, subset_by_index=[dim - n_components, dim - 1])
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    # Directions with (numerically) no variance would be blown up by whitening.
    floor = max(float(eigenvalues[0]), 1e-30) * 1e-10
    eigenvalues = np.maximum(eigenvalues, floor)
    projection = eigenvectors * eigenvalues[None, :] ** whiten_power
    return PCA(mean, projection, eigenvalues, whiten_power)


def l2_normalize(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scale each row of ``(N, d)`` to unit Euclidean norm (in place for float32 input)."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    features /= np.maximum(norms, eps)
    return features


def preprocess_features(features: np.ndarray, n_components: int = 256, whiten_power: float = -0.5) -> tuple[np.ndarray, PCA]:
    """PCA-whiten then L2-normalise, as DeepCluster does before k-means.

    Returns:
        ``(N, d)`` float32 unit rows, and the fitted PCA (to map new images the same way).
    """
    pca = fit_pca(features, n_components, whiten_power)
    return l2_normalize(pca.transform(features)), pca
