"""PCA with whitening, then L2 normalisation: how DeepCluster prepares features.

The reference fits faiss's ``PCAMatrix(d_in, 256, eigen_power=-0.5)`` on all features
anew each epoch and L2-normalises the rows. Whitening (power -0.5) gives every kept
direction unit variance, so k-means is not driven by the few directions of largest
variance alone.

For ImageNet that means holding 1.28M x 4096 float32 features (21 GB) at once.
:class:`StreamingPCA` needs only a bounded sample at full width: it fits the PCA on the
first ``sample_size`` rows it is fed (fed in random order, they are a uniform sample),
then projects every chunk as it arrives, so only ``N x n_components`` is kept.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import scipy.linalg
import torch


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

    def transform(self, features: np.ndarray, chunk_size: int | None = None) -> np.ndarray:
        """Project ``(N, D)`` features to ``(N, d)`` float32, ``chunk_size`` rows at a time
        (default: 64 MiB of input per chunk)."""
        chunk_size = chunk_size or chunk_rows(features.shape[1])
        out = np.empty((len(features), self.n_components), dtype=np.float32)
        mean = self.mean.astype(np.float32)
        projection = self.projection.astype(np.float32)
        for start in range(0, len(features), chunk_size):
            chunk = np.asarray(features[start:start + chunk_size], dtype=np.float32)
            out[start:start + chunk_size] = (chunk - mean) @ projection
        return out

    def project(self, features: np.ndarray) -> np.ndarray:
        """``(N, D)`` features -> ``(N, d)`` float32 unit rows: PCA(-whitening), then L2
        normalisation, the space DeepCluster's k-means clusters in."""
        return l2_normalize(self.transform(features))


def chunk_rows(dim: int, budget_bytes: int = 1 << 26) -> int:
    """Rows of ``dim`` float32 values in ``budget_bytes`` (at least 1,024): the size of the
    temporary copies PCA makes (a 65,536-row chunk of 4096-d features would be 1 GiB)."""
    return max(1024, budget_bytes // (4 * max(dim, 1)))


def fit_pca(features: np.ndarray, n_components: int, whiten_power: float = -0.5,
            chunk_size: int | None = None, max_samples: int | None = None, seed: int = 0) -> PCA:
    """Fit PCA on ``(N, D)`` features.

    The covariance is accumulated in float64 over row chunks (memory ``D x D`` plus one
    chunk), and only the ``n_components`` leading eigenpairs are computed. With at most half
    as many rows as dimensions (a small folder's 4096-d AlexNet features), the same eigenpairs
    come from the ``N x N`` Gram matrix instead, at least 8 times cheaper to decompose.

    Args:
        features: ``(N, D)`` array, any float dtype.
        n_components: dimensions kept; clamped to ``min(D, N - 1)``, the largest number of
            directions with non-zero variance.
        whiten_power: exponent applied to the eigenvalues (-0.5 whitens).
        chunk_size: rows per covariance update (default: 64 MiB of input).
        max_samples: fit on at most this many rows drawn uniformly without replacement
            (seeded by ``seed``); the cost ``2 n D^2`` then no longer grows with ``N``.
            None fits on all rows, as the reference does.
        seed: seeds the row sample.

    Raises:
        ValueError: fewer than 2 rows, or ``max_samples`` < 2.
    """
    if max_samples is not None:
        if max_samples < 2:
            raise ValueError(f"max_samples must be at least 2 (or None for all rows), got {max_samples}")
        if len(features) > max_samples:
            rows = np.sort(np.random.default_rng(seed).choice(len(features), max_samples, replace=False))
            features = features[rows]
    n_rows, dim = features.shape
    chunk_size = chunk_size or chunk_rows(dim)
    if n_rows < 2:
        raise ValueError("PCA needs at least 2 feature vectors")
    n_components = max(1, min(n_components, dim, n_rows - 1))
    mean = np.zeros(dim, dtype=np.float64)
    for start in range(0, n_rows, chunk_size):
        mean += np.asarray(features[start:start + chunk_size], dtype=np.float64).sum(axis=0)
    mean /= n_rows
    mean32 = mean.astype(np.float32)
    if 2 * n_rows <= dim:
        eigenvalues, eigenvectors = _leading_directions_from_gram(features, mean32, n_components)
    else:
        covariance = np.zeros((dim, dim), dtype=np.float64)
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


def _leading_directions_from_gram(features: np.ndarray, mean32: np.ndarray,
                                  n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_components`` leading eigenpairs of the covariance of ``(N, D)`` features with
    ``N`` well below ``D``, through the ``N x N`` Gram matrix instead of the ``D x D``
    covariance (what faiss's PCAMatrix does for few rows): if ``G v = s v`` for the centred
    rows ``X`` (``G = X X^T``), then ``X^T v / sqrt(s)`` is a unit eigenvector of the
    covariance with eigenvalue ``s / N``. Eigenvalues in ascending order, like ``eigh``."""
    centred = np.asarray(features, dtype=np.float32) - mean32
    n_rows = len(centred)
    gram = (centred @ centred.T).astype(np.float64)
    values, vectors = scipy.linalg.eigh(gram, subset_by_index=[n_rows - n_components, n_rows - 1])
    directions = (centred.T.astype(np.float64) @ vectors)
    norms = np.linalg.norm(directions, axis=0)
    # A direction with no variance (duplicate rows) projects every row to 0: keep it at 0.
    directions /= np.where(norms > 0, norms, np.inf)[None, :]
    return np.maximum(values, 0.0) / n_rows, directions


def l2_normalize(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scale each row of ``(N, d)`` to unit Euclidean norm (in place for float32 input)."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    features /= np.maximum(norms, eps)
    return features


def fit_pca_sharded(local: np.ndarray, dim: int, n_components: int, whiten_power: float = -0.5,
                    chunk_size: int | None = None) -> PCA:
    """:func:`fit_pca` of the rows of every process together, each process passing its own
    ``(m_r, dim)`` rows: the row count, the sum and the centred ``dim x dim`` second moment
    are all-reduced (float64), so no process ever holds more rows than its own. Every process
    gets the same PCA, equal to the single-process fit on all rows up to float rounding (the
    sums are added in another order). Without a process group it is the fit of ``local``.

    Raises:
        ValueError: fewer than 2 rows over all processes.
    """
    from deepcluster.distributed import all_reduce_sum

    local = np.asarray(local, dtype=np.float32).reshape(-1, dim)
    chunk_size = chunk_size or chunk_rows(dim)
    totals = torch.zeros(dim + 1, dtype=torch.float64)
    totals[0] = len(local)
    for start in range(0, len(local), chunk_size):
        totals[1:] += torch.from_numpy(local[start:start + chunk_size].astype(np.float64).sum(axis=0))
    totals = all_reduce_sum(totals).numpy()
    n_rows = int(round(totals[0]))
    if n_rows < 2:
        raise ValueError("PCA needs at least 2 feature vectors")
    mean = totals[1:] / n_rows
    mean32 = mean.astype(np.float32)
    covariance = np.zeros((dim, dim), dtype=np.float64)
    for start in range(0, len(local), chunk_size):
        chunk = local[start:start + chunk_size] - mean32
        covariance += (chunk.T @ chunk).astype(np.float64)
    covariance = all_reduce_sum(torch.from_numpy(covariance)).numpy() / n_rows
    n_components = max(1, min(n_components, dim, n_rows - 1))
    eigenvalues, eigenvectors = scipy.linalg.eigh(covariance, subset_by_index=[dim - n_components, dim - 1])
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    eigenvalues = np.maximum(eigenvalues, max(float(eigenvalues[0]), 1e-30) * 1e-10)
    return PCA(mean, eigenvectors * eigenvalues[None, :] ** whiten_power, eigenvalues, whiten_power)


def timed(method: Callable[..., Any]) -> Callable[..., Any]:
    """A method of :class:`StreamingPCA` whose seconds are added to the reducer's ``seconds``."""
    @functools.wraps(method)
    def run(self: StreamingPCA, *args: Any) -> Any:
        began = time.perf_counter()
        try:
            return method(self, *args)
        finally:
            self.seconds += time.perf_counter() - began
    return run


class StreamingPCA:
    """PCA-whitening and L2 normalisation of features that arrive in chunks, in bounded memory.

    The first ``sample_size`` rows fed are kept at full width; once that many have arrived
    the PCA is fitted on them (exactly as :func:`fit_pca`), they are projected and dropped,
    and every later chunk is projected on arrival. If fewer rows arrive in total, the PCA is
    fitted on all of them at :meth:`finish`, which is then exactly the reference's fit.

    Feed the rows in a random order (a seeded permutation of the dataset, e.g. the feature
    pass's loader order) so that the first ``sample_size`` are a uniform sample; in dataset
    order (sorted by class) they would not be.

    Peak memory: the larger of ``sample_size x D`` (the sample, with ``D x D`` float64 for
    the covariance) and ``n_rows x n_components`` (the output) float32, plus one chunk;
    for ImageNet (1.28M x 4096 to 256, the default sample of 100,000) about 2 GB of data
    instead of 21 GB.

    Example::

        reducer = StreamingPCA(n_rows=len(dataset), n_components=256)
        for rows, features in feature_chunks:  # rows: (m,) dataset indices, random order
            reducer.add(features, rows)
        points, pca = reducer.finish()  # (N, 256) float32, unit rows

    Args:
        n_rows: rows of the full output (rows never fed stay zero; see ``seen``; ``seconds``
            counts the time spent in ``add`` and ``finish``).
        n_components: output width (clamped like :func:`fit_pca`).
        whiten_power: -0.5 whitens, 0 only rotates and reduces.
        sample_size: rows the PCA is fitted on (at least 2); with ``gather_sample``, this
            process's share of them.
        normalize: L2-normalise the projected rows (DeepCluster does).
        gather_sample: called once with this process's ``(m, D)`` sample just before the
            fit; returns the rows to fit on. With several processes, each holding a shard
            of the data, pass :func:`deepcluster.distributed.all_gather_rows` so
            that every process fits the same PCA on everybody's sample.
        fit: called once with this process's ``(m, D)`` sample instead of
            ``gather_sample`` + :func:`fit_pca`; returns the PCA (with several processes,
            :func:`fit_pca_sharded`, which all-reduces the covariance instead of gathering rows).
    """

    def __init__(self, n_rows: int, n_components: int = 256, whiten_power: float = -0.5,
                 sample_size: int = 100_000, normalize: bool = True,
                 gather_sample: Callable[[np.ndarray], np.ndarray] | None = None,
                 fit: Callable[[np.ndarray], PCA] | None = None):
        if sample_size < 2:
            raise ValueError(f"sample_size must be at least 2, got {sample_size}")
        if n_rows < 1:
            raise ValueError(f"n_rows must be positive, got {n_rows}")
        self.n_rows = n_rows
        self.n_components = n_components
        self.whiten_power = whiten_power
        self.sample_size = sample_size
        self.normalize = normalize
        self.gather_sample = gather_sample
        self.fit = fit
        self.pca: PCA | None = None
        self.seen = np.zeros(n_rows, dtype=bool)
        self._output: np.ndarray | None = None
        self._sample: np.ndarray | None = None
        self._sample_rows = np.empty(0, dtype=np.int64)
        self._filled = 0
        self.seconds = 0.0

    @timed
    def add(self, features: np.ndarray, rows: np.ndarray) -> None:
        """Feed ``(m, D)`` features of dataset rows ``rows`` (``(m,)`` int, each at most once).

        Raises:
            ValueError: shapes that do not match, a row out of range or fed twice.
        """
        features = np.asarray(features)
        rows = np.asarray(rows, dtype=np.int64)
        if features.ndim != 2 or len(features) != len(rows):
            raise ValueError(f"features must be (m, D) with one row index each; got features {features.shape} "
                             f"and {len(rows)} row indices")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise ValueError(f"row indices must be in [0, {self.n_rows}); got {rows.min()} .. {rows.max()}")
        if self.seen[rows].any() or len(np.unique(rows)) != len(rows):
            raise ValueError("a row was fed twice; feed every dataset row at most once")
        self.seen[rows] = True
        if self.pca is not None:
            self._project(features, rows)
            return
        if self._sample is None:
            self._sample = np.empty((self.sample_size, features.shape[1]), dtype=np.float32)
        take = min(len(rows), self.sample_size - self._filled)
        self._sample[self._filled:self._filled + take] = features[:take]
        self._sample_rows = np.concatenate([self._sample_rows, rows[:take]])
        self._filled += take
        if self._filled == self.sample_size:
            self._fit()
        if take < len(rows):
            self._project(features[take:], rows[take:])

    @timed
    def finish(self) -> tuple[np.ndarray, PCA]:
        """The ``(n_rows, n_components)`` float32 reduced features and the fitted PCA.

        Raises:
            ValueError: fewer than 2 rows were fed.
        """
        if self.pca is None:
            if self._filled < 2 and self.gather_sample is None and self.fit is None:
                raise ValueError(f"PCA needs at least 2 feature vectors, got {self._filled}")
            self._sample = self._sample[:self._filled] if self._sample is not None else None
            self._fit()
        return self._output, self.pca

    def _fit(self) -> None:
        sample, rows = self._sample, self._sample_rows
        self._sample, self._sample_rows = None, np.empty(0, dtype=np.int64)
        if self.fit is not None:
            self.pca = self.fit(sample if sample is not None else np.zeros((0, 0), dtype=np.float32))
        else:
            if self.gather_sample is not None:
                local = sample if sample is not None else np.zeros((0, 0), dtype=np.float32)
                fit_on = self.gather_sample(local)
            else:
                fit_on = sample
            if fit_on is None or len(fit_on) < 2:
                raise ValueError(f"PCA needs at least 2 feature vectors, got {0 if fit_on is None else len(fit_on)}")
            self.pca = fit_pca(fit_on, self.n_components, self.whiten_power)
            del fit_on
        # Project the sample and free it before the full output exists: the peak is then
        # the sample or the output, not both.
        projected = None
        if sample is not None and len(rows):
            projected = self._reduce(sample)
        del sample
        self._output = np.zeros((self.n_rows, self.pca.n_components), dtype=np.float32)
        if projected is not None:
            self._output[rows] = projected

    def _reduce(self, features: np.ndarray) -> np.ndarray:
        return self.pca.project(features) if self.normalize else self.pca.transform(features)

    def _project(self, features: np.ndarray, rows: np.ndarray) -> None:
        self._output[rows] = self._reduce(features)
