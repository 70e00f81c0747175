"""k-means: one Lloyd loop for the L2 and the cosine metric, on one process or many.

Exactly ``n_iter`` iterations (no early stop, as the references), each:

1. **Assign.** Best centroid of every point: nearest in L2 (metric ``l2``), or largest dot
   product (metric ``cosine``, unit-norm points: spherical k-means). The only expensive
   step, done by a search object of :mod:`deepcluster.clustering.search` (backend
   ``faiss`` or ``torch``). In the same pass, each cluster's sum and size are accumulated.
2. **Update.** Every non-empty centroid moves to the mean of its points (``l2``) or to
   their normalised sum (``cosine``: centroids stay unit vectors).
3. **Empty clusters.** One rule set for both metrics (:mod:`deepcluster.clustering.empty`):
   ``split`` (DeepCluster's, the default), ``nudge`` (DeepCluster-v2's) or ``keep``.

The returned labels come from a last assignment with the final centroids; the objective
(mean squared distance for ``l2``, never rising; mean dot product for ``cosine``, never
falling with ``split`` or ``keep``) is recorded at every assignment.

One process is a world of one: each process passes its rows and a ``shard``; sums, sizes
and objective are all-reduced (no-ops in a world of one), and every random draw depends
only on the seed and the global point set (the processes' rows in rank order), so a world
of several equals a world of one on the same points up to the order of float additions.

Arithmetic (kept so that results do not change from the earlier implementations): for
``l2`` on a CPU, ``n_threads`` worker threads each take a fixed share of the blocks and run
the search single-threaded, summing in float32 flushed to float64 every ``FLUSH_ROWS``
rows; for ``cosine`` (and on a GPU) one walker sums in float64 in row order with torch's
own threads, and the cosine objective is the float32 sum of the scores (the spherical
k-means reference's arithmetic).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from deepcluster.clustering.empty import (EMPTY_RULES, Project, Update, check_empty_rule, means, nudge_round,
                                          split_empty_clusters, split_round)
from deepcluster.clustering.search import (BACKENDS, DOT_ROWS, METRICS, FaissSearch, TorchSearch, block_rows,
                                           check_backend, check_metric, cpu_block_rows, make_search, resolve_device)
from deepcluster.clustering.seeding import INITS, init_centroids, labelling_centroids
from deepcluster.clustering.shard import Shard, as_float32_tensor, as_shard

# Rows summed in float32 before the partial sums are added to float64 totals: bounds the
# rounding error of a cluster's sum without a float64 copy of every point.
FLUSH_ROWS = 1 << 16
PASS_ROWS = 1 << 16


@dataclass(frozen=True)
class Metric:
    """How a metric updates and places centroids.

    Attributes:
        name: ``l2`` or ``cosine``.
        update: ``(sums, sizes) -> centroids`` of non-empty clusters.
        project: puts a perturbed centroid back in place (identity, or onto the sphere).
        row_order: sums in float64 by one walker in row order, objective as the float32
            sum of the scores (the spherical reference); else threaded float32 partial sums.
    """

    name: str
    update: Update
    project: Project
    row_order: bool


def _unit_sums(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return F.normalize(sums, dim=1).to(torch.float32)


def _unit(centroids: torch.Tensor) -> torch.Tensor:
    return F.normalize(centroids, dim=-1)


METRIC = {"l2": Metric("l2", means, lambda c: c, False), "cosine": Metric("cosine", _unit_sums, _unit, True)}


@dataclass
class KMeansResult:
    """Outcome of one k-means run.

    Attributes:
        assignments: ``(N,)`` int64 index of the best final centroid of each point (of
            this process's points when sharded over processes).
        centroids: ``(k, d)`` float32 final centroids (unit rows for ``cosine``).
        objective: one value per iteration (at its assignment step) and a last one for the
            final assignment: mean squared distance to the nearest centroid (``l2``, never
            rises) or mean dot product with the best centroid (``cosine``).
        n_split: empty clusters re-seeded (``split``/``nudge``), over all iterations.
        n_empty: clusters that received no point in the final assignment.
        splits_per_iteration: ``n_split`` broken down by iteration.
        metric: ``l2`` or ``cosine``.
    """

    assignments: np.ndarray
    centroids: np.ndarray
    objective: list[float] = field(default_factory=list)
    n_split: int = 0
    n_empty: int = 0
    splits_per_iteration: list[int] = field(default_factory=list)
    metric: str = "l2"

    def predict(self, points: np.ndarray | torch.Tensor, backend: str = "torch",
                device: str | torch.device = "cpu") -> np.ndarray:
        """Best final centroid of new ``(n, d)`` points: ``(n,)`` int64 labels."""
        return predict(points, self.centroids, backend=backend, device=device, metric=self.metric)


def nearest_centroid(points: np.ndarray | torch.Tensor, centroids: np.ndarray | torch.Tensor,
                     backend: str = "faiss", device: str = "cpu", metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """Index of, and squared distance to, the nearest centroid of every point (``l2``), or
    index of, and dot product with, the centroid of largest dot product (``cosine``).

    Args:
        points: ``(N, d)`` float32 (other float dtypes are converted).
        centroids: ``(k, d)``.
        backend: ``faiss`` or ``torch``.
        device: where the search runs (``cpu``, ``cuda[:n]``, ``auto``).
        metric: ``l2`` or ``cosine``.

    Returns:
        ``(N,)`` int64 labels and ``(N,)`` float32 squared distances or dot products.

    Raises:
        ValueError: unknown backend or metric, or points and centroids of different widths.
    """
    points_t = as_float32_tensor(points)
    centroids_t = as_float32_tensor(centroids, "centroids")
    if points_t.shape[1] != centroids_t.shape[1]:
        raise ValueError(f"points have {points_t.shape[1]} dimensions but centroids have {centroids_t.shape[1]}")
    check_backend(backend)
    run = METRIC[check_metric(metric)]
    run_device = resolve_device(device)
    if backend == "torch":
        points_t = points_t.to(run_device)
    n_threads = torch.get_num_threads()
    with cpu_threads(n_threads if run.row_order else 1):
        finder = _Assigner(points_t, run, backend, run_device, len(centroids_t), n_threads, accumulate=False,
                           keep_distances=True)
        try:
            finder.run(centroids_t.to(points_t.device))
        finally:
            finder.close()
    return finder.labels.cpu().numpy(), finder.distances.cpu().numpy()


def predict(points: np.ndarray | torch.Tensor, centroids: np.ndarray | torch.Tensor, backend: str = "torch",
            device: str | torch.device = "cpu", metric: str = "l2") -> np.ndarray:
    """Cluster of new points given saved centroids: ``(n,)`` int64 best-centroid labels.

    Args:
        points: ``(n, d)`` points, preprocessed as the clustered ones were (same PCA, L2
            normalisation).
        centroids: ``(k, d)`` centroids of a :class:`KMeansResult`.
        backend: ``torch`` (default, no faiss needed) or ``faiss``.
        device: where the search runs.
        metric: the metric the centroids were fitted with.
    """
    return nearest_centroid(points, centroids, backend, device, metric)[0]


@contextmanager
def cpu_threads(n_threads: int) -> Iterator[None]:
    """Run torch's CPU ops with ``n_threads`` threads inside the block.

    The per-block bookkeeping (``index_add_`` of a few MB) is memory-bound: threading it
    gains nothing, and on a busy machine each parallel region waits for its slowest
    thread, which made it 10x slower than one thread in our measurements. Not meant for
    use from several Python threads at once (the setting is process-wide).
    """
    previous = torch.get_num_threads()
    if previous == n_threads:
        yield
        return
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class _Worker:
    """One thread's share of an assignment pass: its search object and running sums."""

    search: TorchSearch | FaissSearch
    sums: torch.Tensor  # (k, d) float64
    partial: torch.Tensor | None  # (k, d) float32, threaded CPU walkers only
    total: float = 0.0
    pending: int = 0


def _single_threaded_worker() -> None:
    """Initialiser of the worker threads: each runs torch and faiss on one thread."""
    torch.set_num_threads(1)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        pass


class _Assigner:
    """Assignment passes over the points: best centroid, per-cluster sums, objective.

    ``l2`` on a CPU: ``n_workers`` threads each take every ``n_workers``-th block of rows
    (a static split, so the order of additions, hence the result, does not depend on
    timing) and run torch and faiss single-threaded on it; each keeps float32 partial sums
    of the blocks it assigned, flushed into its float64 sums every ``FLUSH_ROWS`` rows.
    ``cosine``, and any metric on a GPU: one walker sums in float64 directly.
    """

    def __init__(self, points: torch.Tensor, metric: Metric, backend: str, device: torch.device, n_clusters: int,
                 n_workers: int, accumulate: bool = True, keep_distances: bool = False):
        self.points, self.metric, self.accumulate = points, metric, accumulate
        keep_distances = keep_distances or metric.row_order
        self.distances = torch.empty(len(points), device=points.device) if keep_distances else None
        on_gpu = points.device.type == "cuda" or device.type == "cuda"
        threaded = not (on_gpu or metric.row_order)
        self.n_workers = max(1, n_workers) if threaded else 1
        if metric.name == "cosine" and backend == "torch":
            self.rows = DOT_ROWS
        elif not on_gpu:
            self.rows = cpu_block_rows(backend, n_clusters)
        else:
            self.rows = block_rows(n_clusters, device) if backend == "torch" else 65536
        self.labels = torch.empty(len(points), dtype=torch.int64, device=points.device)
        self.squared_norms = None
        if backend == "torch" and metric.name == "l2":  # ||x||^2 once, not once per iteration
            self.squared_norms = torch.cat([(block * block).sum(1) for block in points.split(PASS_ROWS)]) \
                if len(points) else torch.empty(0, device=points.device)
        dim = points.shape[1]
        self.workers = []
        for _ in range(self.n_workers):
            sums = torch.zeros(n_clusters if accumulate else 0, dim, dtype=torch.float64, device=points.device)
            partial = torch.zeros_like(sums, dtype=torch.float32) if accumulate and threaded else None
            self.workers.append(_Worker(make_search(backend, device, metric.name), sums, partial))
        self.pool = ThreadPoolExecutor(self.n_workers, initializer=_single_threaded_worker) \
            if self.n_workers > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def run(self, centroids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Assign every point to its best of ``centroids`` (labels in ``self.labels``).

        Returns:
            ``(k, d)`` float64 sums of the points of each cluster (empty when not
            accumulating) and their summed distance or score, over this process's points.
        """
        for worker in self.workers:
            worker.search.set_centroids(centroids)
            worker.sums.zero_()
            if worker.partial is not None:
                worker.partial.zero_()
            worker.total, worker.pending = 0.0, 0
        if self.pool is None:
            self._walk(0)
        else:
            list(self.pool.map(self._walk, range(self.n_workers)))
        sums = self.workers[0].sums
        for worker in self.workers[1:]:
            sums += worker.sums
        if self.metric.row_order:
            return sums, float(self.distances.sum())
        return sums, sum(worker.total for worker in self.workers)

    def _walk(self, index: int) -> None:
        worker = self.workers[index]
        for start in range(index * self.rows, len(self.points), self.n_workers * self.rows):
            block = self.points[start:start + self.rows]
            norms = None if self.squared_norms is None else self.squared_norms[start:start + self.rows]
            labels, distances = worker.search.search(block, norms)
            self.labels[start:start + len(block)] = labels
            if self.distances is not None:
                self.distances[start:start + len(block)] = distances
            if not self.metric.row_order:
                worker.total += float(distances.sum(dtype=torch.float64))
            if self.accumulate:
                self._add(worker, labels, block)
        if worker.partial is not None and worker.pending:
            worker.sums += worker.partial

    @staticmethod
    def _add(worker: _Worker, labels: torch.Tensor, block: torch.Tensor) -> None:
        if worker.partial is None:
            worker.sums.index_add_(0, labels, block.double())
            return
        worker.partial.index_add_(0, labels, block)
        worker.pending += len(block)
        if worker.pending >= FLUSH_ROWS:
            worker.sums += worker.partial
            worker.partial.zero_()
            worker.pending = 0


def _reduce(shard: Shard, sums: torch.Tensor | None, counts: torch.Tensor,
            total: float) -> tuple[torch.Tensor | None, torch.Tensor, float]:
    """Global ``(k, d)`` sums, ``(k,)`` sizes and summed distance, in one collective."""
    if not shard.distributed:
        return sums, counts, total
    parts = [counts, torch.tensor([total], dtype=torch.float64, device=counts.device)]
    if sums is not None:
        parts.insert(0, sums.flatten())
    packed = shard.all_reduce_sum(torch.cat(parts))
    n_clusters = len(counts)
    offset = 0 if sums is None else sums.numel()
    out_sums = None if sums is None else packed[:offset].view_as(sums)
    return out_sums, packed[offset:offset + n_clusters], float(packed[-1])


@dataclass
class _Run:
    """The fixed settings and random streams of one k-means run."""

    metric: Metric
    backend: str
    device: torch.device
    empty: str
    seed: int
    n_threads: int
    rng: np.random.Generator  # numpy draws: random and kmeans++ starts, the split rule
    generator: torch.Generator  # torch draws: the randperm start, the nudge rule


def _check(n_clusters: int, n_iter: int, init: str | np.ndarray, total: int, dim: int) -> np.ndarray | None:
    """The given starting centroids, if any; raises ValueError on bad arguments."""
    given = None if isinstance(init, str) else np.array(init, dtype=np.float32)
    if given is None and init not in INITS:
        raise ValueError(f"unknown k-means init {init!r}; choose one of: {', '.join(INITS)} or a (k, d) array")
    if n_iter < 0:
        raise ValueError(f"n_iter must be at least 0, got {n_iter}")
    if not 1 <= n_clusters <= total:
        raise ValueError(f"n_clusters must be between 1 and the number of points ({total}), got {n_clusters}")
    if given is not None and given.shape != (n_clusters, dim):
        raise ValueError(f"init centroids must have shape (n_clusters, d) = ({n_clusters}, {dim}), "
                         f"got {given.shape}")
    return given


def kmeans(points: np.ndarray | torch.Tensor, n_clusters: int, n_iter: int = 20, seed: int = 0,
           backend: str = "faiss", init: str | np.ndarray = "random", device: str | torch.device = "cpu", *,
           metric: str = "l2", empty: str = "split", shard: bool | Shard = False, n_threads: int | None = None,
           on_iteration: Callable[[int], None] | None = None) -> KMeansResult:
    """Cluster ``(N, d)`` points into ``n_clusters`` with Lloyd's algorithm (see the module doc).

    Args:
        points: ``(N, d)`` array or tensor (this process's rows when sharded), converted to
            float32 once (a float32 CPU array is used without a copy; the torch backend on
            a GPU copies it there once). Unit rows for ``cosine`` (used as given).
        n_clusters: k, at most N (the global N when sharded).
        n_iter: Lloyd iterations (0 returns the initial centroids' assignment).
        seed: seeds initialisation and empty-cluster draws; same seed, same result.
        backend: ``faiss`` or ``torch`` (the search).
        init: ``random``, ``kmeans++``, ``randperm`` (see
            :func:`deepcluster.clustering.seeding.init_centroids`), or a ``(k, d)`` array of
            starting centroids, the same on every process (e.g. from
            :func:`deepcluster.clustering.seeding.labelling_centroids`).
        device: ``cpu``, ``cuda[:n]`` or ``auto``: where the search runs.
        metric: ``l2`` or ``cosine`` (spherical k-means).
        empty: ``split``, ``nudge`` or ``keep`` (:mod:`deepcluster.clustering.empty`).
        shard: ``False`` (a world of one), ``True`` (``points`` are this process's
            contiguous rows of the default process group, rank 0 first; a world of one
            without a group), or a :class:`Shard`.
        n_threads: CPU threads (default: ``torch.get_num_threads()``).
        on_iteration: called with the iteration number after each Lloyd iteration and
            with ``n_iter`` after the final assignment (progress bars); no effect on results.

    Returns:
        A :class:`KMeansResult`; when sharded, assignments of the local points.

    Raises:
        ValueError: k < 1, k > N, n_iter < 0, or an unknown backend, metric, rule, init or device.
    """
    check_backend(backend)
    run_metric = METRIC[check_metric(metric)]
    check_empty_rule(empty)
    run_device = resolve_device(device)
    points_t = as_float32_tensor(points)
    world = as_shard(shard, len(points_t))
    given = _check(n_clusters, n_iter, init, world.total, points_t.shape[1])
    if backend == "torch":
        points_t = points_t.to(run_device)  # once: the search reads the points every iteration
    n_threads = n_threads or torch.get_num_threads()
    run = _Run(run_metric, backend, run_device, empty, seed, n_threads, np.random.default_rng(seed),
               torch.Generator().manual_seed(seed))
    if given is None:
        given = init_centroids(points_t, n_clusters, init, run.rng, device=run_device, shard=world,
                               generator=run.generator)
    centroids = torch.from_numpy(given).to(points_t.device)
    # Threaded l2 walkers parallelise and every op runs single-threaded; one walker uses torch's threads.
    with cpu_threads(n_threads if run_metric.row_order else 1):
        return _lloyd(points_t, centroids, n_iter, run, world, on_iteration)


def _fill_empty(run: _Run, points: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                counts: torch.Tensor, sums: torch.Tensor, shard: Shard, iteration: int) -> int:
    """Apply the run's empty-cluster rule after an update; returns the clusters re-seeded."""
    if run.empty == "split":
        salt = run.seed * 1_000_003 + iteration
        return split_round(points, labels, centroids, counts, sums, run.rng, shard, salt=salt,
                           update=run.metric.update, project=run.metric.project).n_split
    if run.empty == "nudge":
        return nudge_round(centroids, counts, run.generator, run.metric.project)
    return 0


def _lloyd(points_t: torch.Tensor, centroids: torch.Tensor, n_iter: int, run: _Run, shard: Shard,
           on_iteration: Callable[[int], None] | None = None) -> KMeansResult:
    """The iterations of :func:`kmeans`, from initial ``centroids`` (modified in place)."""
    n_clusters = len(centroids)
    assigner = _Assigner(points_t, run.metric, run.backend, run.device, n_clusters, run.n_threads)
    finder = _Assigner(points_t, run.metric, run.backend, run.device, n_clusters, run.n_threads, accumulate=False)
    objective: list[float] = []
    splits: list[int] = []
    try:
        for iteration in range(n_iter):
            local_sums, local_total = assigner.run(centroids)
            counts = torch.bincount(assigner.labels, minlength=n_clusters).double()
            sums, counts, total = _reduce(shard, local_sums, counts, local_total)
            objective.append(total / shard.total)
            counts = counts.round().long()
            filled = counts > 0
            centroids[filled] = run.metric.update(sums[filled], counts[filled])
            splits.append(_fill_empty(run, points_t, assigner.labels, centroids, counts, sums, shard, iteration))
            if on_iteration is not None:
                on_iteration(iteration)
        _, local_total = finder.run(centroids)
        if on_iteration is not None:
            on_iteration(n_iter)
    finally:
        assigner.close()
        finder.close()
    counts = torch.bincount(finder.labels, minlength=n_clusters).double()
    _, counts, total = _reduce(shard, None, counts, local_total)
    objective.append(total / shard.total)
    n_empty = int((counts == 0).sum())
    return KMeansResult(finder.labels.cpu().numpy(), centroids.cpu().numpy(), objective, sum(splits), n_empty, splits,
                        run.metric.name)


__all__ = ["BACKENDS", "EMPTY_RULES", "INITS", "METRICS", "KMeansResult", "Shard", "init_centroids", "kmeans",
           "labelling_centroids", "nearest_centroid", "predict", "split_empty_clusters"]
