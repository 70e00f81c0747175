"""k-means with the paper's explicit empty-cluster split, on any backend and many processes.

Lloyd's algorithm, exactly ``n_iter`` iterations (no early stop, as the reference):

1. **Assign.** Nearest centroid of every point (the only expensive step, ``2 N k d`` flops,
   done by a backend from :mod:`deepcluster.clustering.search`: ``faiss`` or ``torch``).
   In the same pass over the points, each cluster's sum and size are accumulated, so the
   update costs one ``index_add`` per block of points that is still in cache. On a CPU,
   ``n_threads`` worker threads each take a fixed share of the blocks and run the search
   and the sums single-threaded (no shared state, no locks, same result for any timing).
2. **Update.** Every non-empty centroid moves to the mean of its points.
3. **Split.** Each empty cluster takes half of a non-empty one (DeepCluster §3.3 / faiss):
   a donor is drawn with probability proportional to ``size - 1``; the two centroids
   become ``c (1 +- eps s)`` (``s`` = +1, -1, +1, ... over dimensions) and the donor's
   points go to the nearer of the two; each of the two clusters then moves to the mean of
   its half. A donor gives at most once per iteration, so the splits of one iteration are
   independent and cost one pass over the donors' points (and one collective).

The sequence of random draws depends only on the seed and on cluster sizes, never on how
the points are spread over processes: with a process group (``distributed=True``), each
process holds a contiguous shard of the points, the sums and sizes are all-reduced, and
the result equals the single-process run with the same seed (up to the order of float
additions). Without a process group, ``distributed=True`` is the single-process run.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from deepcluster.clustering import collective
from deepcluster.clustering.search import (BACKENDS, FaissSearch, TorchSearch, block_rows, check_backend,
                                           cpu_block_rows, make_search, resolve_device)

INITS = ("random", "kmeans++")

# Relative perturbation of a split centroid, as faiss's split of empty clusters uses.
SPLIT_EPS = 1.0 / 1024.0
# Rows summed in float32 before the partial sums are added to float64 totals: bounds the
# rounding error of a cluster's sum without a float64 copy of every point.
FLUSH_ROWS = 1 << 16
# Rows per pass of the split and of k-means++ (bounds their temporary memory).
PASS_ROWS = 1 << 16


@dataclass
class KMeansResult:
    """Outcome of one k-means run.

    Attributes:
        assignments: ``(N,)`` int64 index of the nearest final centroid of each point
            (with ``distributed=True``: of this process's points).
        centroids: ``(k, d)`` float32 final centroids.
        objective: mean squared distance of the points to their nearest centroid, one value
            per iteration (at its assignment step) and a last one for the final assignment;
            never rises from one value to the next.
        n_split: empty clusters re-seeded by splitting a non-empty one, over all iterations.
        n_empty: clusters that received no point in the final assignment.
        splits_per_iteration: ``n_split`` broken down by iteration.
    """

    assignments: np.ndarray
    centroids: np.ndarray
    objective: list[float] = field(default_factory=list)
    n_split: int = 0
    n_empty: int = 0
    splits_per_iteration: list[int] = field(default_factory=list)

    def predict(self, points: np.ndarray | torch.Tensor, backend: str = "torch",
                device: str | torch.device = "cpu") -> np.ndarray:
        """Nearest final centroid of new ``(n, d)`` points: ``(n,)`` int64 labels."""
        return predict(points, self.centroids, backend=backend, device=device)


def as_float32_tensor(points: np.ndarray | torch.Tensor, name: str = "points") -> torch.Tensor:
    """A 2-d float32 contiguous tensor sharing memory with ``points`` where possible.

    Raises:
        ValueError: ``points`` is not 2-d.
    """
    if isinstance(points, torch.Tensor):
        tensor = points.detach()
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array (N, d), got shape {tuple(tensor.shape)}")
    return tensor.to(torch.float32).contiguous()


def nearest_centroid(points: np.ndarray | torch.Tensor, centroids: np.ndarray | torch.Tensor,
                     backend: str = "faiss", device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Index of, and squared distance to, the nearest centroid of every point.

    Args:
        points: ``(N, d)`` float32 (other float dtypes are converted).
        centroids: ``(k, d)``.
        backend: ``faiss`` or ``torch``.
        device: where the search runs (``cpu``, ``cuda[:n]``, ``auto``).

    Returns:
        ``(N,)`` int64 labels and ``(N,)`` float32 squared distances.

    Raises:
        ValueError: unknown backend, or points and centroids of different widths.
    """
    points_t = as_float32_tensor(points)
    centroids_t = as_float32_tensor(centroids, "centroids")
    if points_t.shape[1] != centroids_t.shape[1]:
        raise ValueError(f"points have {points_t.shape[1]} dimensions but centroids have {centroids_t.shape[1]}")
    check_backend(backend)
    run_device = resolve_device(device)
    if backend == "torch":
        points_t = points_t.to(run_device)
    n_threads = torch.get_num_threads()
    with cpu_threads(1):
        finder = _Assigner(points_t, backend, run_device, len(centroids_t), n_threads, accumulate=False,
                           keep_distances=True)
        try:
            finder.run(centroids_t.to(points_t.device))
        finally:
            finder.close()
    return finder.labels.cpu().numpy(), finder.distances.cpu().numpy()


def predict(points: np.ndarray | torch.Tensor, centroids: np.ndarray | torch.Tensor, backend: str = "torch",
            device: str | torch.device = "cpu") -> np.ndarray:
    """Cluster of new points given saved centroids: ``(n,)`` int64 nearest-centroid labels.

    Args:
        points: ``(n, d)`` points, preprocessed as the clustered ones were (same PCA, L2
            normalisation).
        centroids: ``(k, d)`` centroids of a :class:`KMeansResult`.
        backend: ``torch`` (default, no faiss needed) or ``faiss``.
        device: where the search runs.
    """
    return nearest_centroid(points, centroids, backend, device)[0]


# ----------------------------------------------------------------------------- sharding


@dataclass
class Shard:
    """Which rows of the global point set this process holds: ``[offset, offset + size)``.

    Its collectives run over the default process group when ``distributed`` and are
    no-ops otherwise, so a single-process run never communicates.
    """

    offset: int
    size: int
    total: int
    distributed: bool = False

    @staticmethod
    def of(local_rows: int, distributed: bool) -> "Shard":
        if not (distributed and collective.is_distributed()):
            return Shard(0, local_rows, local_rows)
        sizes = collective.all_gather_ints(local_rows)
        return Shard(sum(sizes[:collective.rank()]), local_rows, sum(sizes), True)

    @property
    def rank(self) -> int:
        return collective.rank() if self.distributed else 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return collective.all_reduce_sum(tensor) if self.distributed else tensor

    def all_gather_ints(self, value: int) -> list[int]:
        return collective.all_gather_ints(value) if self.distributed else [int(value)]

    def all_gather_floats(self, value: float) -> list[float]:
        return collective.all_gather_floats(value) if self.distributed else [float(value)]


def tie_bits(global_rows: torch.Tensor, salt: int) -> torch.Tensor:
    """A pseudo-random bit per global row index (splitmix64 of ``row + salt``): breaks ties
    of the split the same way whatever process holds the row."""
    mask = (1 << 64) - 1
    value = (global_rows.cpu().numpy().astype(np.uint64) + np.uint64(salt & mask))
    with np.errstate(over="ignore"):
        value = value * np.uint64(0x9E3779B97F4A7C15)
        value ^= value >> np.uint64(30)
        value = value * np.uint64(0xBF58476D1CE4E5B9)
        value ^= value >> np.uint64(27)
    return torch.from_numpy((value >> np.uint64(63)).astype(bool)).to(global_rows.device)


# ------------------------------------------------------------------------ initialisation


def _gather_rows(points: torch.Tensor, global_rows: np.ndarray, shard: Shard) -> torch.Tensor:
    """Rows ``global_rows`` of the global point set, on every process (float32, exact)."""
    out = torch.zeros(len(global_rows), points.shape[1], dtype=torch.float32, device=points.device)
    local = (global_rows >= shard.offset) & (global_rows < shard.offset + shard.size)
    if local.any():
        positions = torch.from_numpy(np.flatnonzero(local)).to(points.device)
        rows = torch.from_numpy(global_rows[local] - shard.offset).to(points.device)
        out[positions] = points[rows]
    return shard.all_reduce_sum(out)


def init_centroids(points: np.ndarray | torch.Tensor, n_clusters: int, method: str, rng: np.random.Generator,
                   device: str = "cpu", shard: Shard | None = None) -> np.ndarray:
    """Initial ``(k, d)`` float32 centroids.

    ``random``: ``k`` points at distinct indices, drawn uniformly. ``kmeans++``: the first centroid
    uniformly, each next one with probability proportional to the squared distance to the
    nearest centroid already chosen (``k`` passes over the points; sequential by nature).

    Args:
        points: ``(N, d)`` points (this process's shard when ``shard`` spans processes).
        n_clusters: k.
        method: ``random`` or ``kmeans++``.
        rng: the run's generator; the same draws on every process.
        device: where k-means++ computes distances (with torch, whatever the search backend).
        shard: this process's rows of the global set; default all of them.

    Raises:
        ValueError: unknown method.
    """
    if method not in INITS:
        raise ValueError(f"unknown k-means init {method!r}; choose one of: {', '.join(INITS)}")
    points_t = as_float32_tensor(points)
    shard = shard or Shard(0, len(points_t), len(points_t))
    if method == "random":
        chosen = rng.choice(shard.total, n_clusters, replace=False)
        return _gather_rows(points_t, chosen, shard).cpu().numpy()
    points_t = points_t.to(resolve_device(device))
    squared_norms = (points_t * points_t).sum(1)
    centroids = torch.empty(n_clusters, points_t.shape[1], dtype=torch.float32, device=points_t.device)
    centroids[0] = _gather_rows(points_t, np.array([rng.integers(shard.total)]), shard)[0]
    closest = torch.full((len(points_t),), float("inf"), device=points_t.device)
    for i in range(n_clusters):
        if i > 0:
            totals = shard.all_gather_floats(float(closest.sum(dtype=torch.float64)))
            grand_total = sum(totals)
            if grand_total <= 0:  # every point already coincides with a centroid
                choice = int(rng.integers(shard.total))
            else:
                target = rng.random() * grand_total
                owner = int(np.searchsorted(np.cumsum(totals), target, side="right"))
                owner = min(owner, len(totals) - 1)
                choice = -1
                if owner == shard.rank and len(points_t) > 0:
                    cumulative = torch.cumsum(closest.double(), 0)
                    local_target = target - sum(totals[:owner])
                    index = int(torch.searchsorted(cumulative, torch.tensor([local_target], dtype=torch.float64,
                                                                             device=cumulative.device),
                                                   right=True)[0])
                    choice = shard.offset + min(index, len(points_t) - 1)
                choice = max(shard.all_gather_ints(choice))
            centroids[i] = _gather_rows(points_t, np.array([choice]), shard)[0]
        if i == n_clusters - 1:
            break
        center = centroids[i]
        for start in range(0, len(points_t), PASS_ROWS):
            block = points_t[start:start + PASS_ROWS]
            distance = squared_norms[start:start + PASS_ROWS] - 2.0 * (block @ center) + center.dot(center)
            distance.clamp_(min=0)
            torch.minimum(closest[start:start + PASS_ROWS], distance, out=closest[start:start + PASS_ROWS])
    return centroids.cpu().numpy()


# ---------------------------------------------------------------------------- the split


def _choose_donors(counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pair every empty cluster (in index order) with a donor, drawn with probability
    proportional to ``size - 1`` among clusters that have not given yet this round.

    Returns:
        ``(P,)`` int64 targets and ``(P,)`` int64 donors; ``P`` is smaller than the number
        of empty clusters when donors run out (the rest wait for the next iteration).
    """
    empty = np.flatnonzero(counts == 0)
    if len(empty) == 0:
        return empty.astype(np.int64), empty.astype(np.int64)
    weights = np.maximum(counts.astype(np.float64) - 1.0, 0.0)
    targets, donors = [], []
    for target in empty:
        total = weights.sum()
        if total <= 0:
            break  # no cluster left with two points to split
        donor = int(np.searchsorted(np.cumsum(weights), rng.random() * total, side="right"))
        donor = min(donor, len(weights) - 1)
        while weights[donor] <= 0:  # rounding at the very end of the cumulative sum
            donor -= 1
        weights[donor] = 0.0
        targets.append(int(target))
        donors.append(donor)
    return np.asarray(targets, dtype=np.int64), np.asarray(donors, dtype=np.int64)


@dataclass
class SplitOutcome:
    """What one round of splits did."""

    n_split: int
    moved_rows: torch.Tensor  # (M,) local rows that moved to a target, valid pairs only
    moved_to: torch.Tensor  # (M,) their new cluster


def split_round(points: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor,
                sums: torch.Tensor, rng: np.random.Generator, shard: Shard, salt: int,
                track_moves: bool = False) -> SplitOutcome:
    """Split donors into the empty clusters, updating ``centroids``, ``counts`` and ``sums``.

    Args:
        points: ``(n, d)`` float32, this process's rows.
        labels: ``(n,)`` int64 current assignment of those rows (not modified).
        centroids: ``(k, d)`` float32, the means of the current assignment (modified).
        counts: ``(k,)`` int64 global cluster sizes (modified).
        sums: ``(k, d)`` float64 global cluster sums (modified).
        rng: the run's generator (same draws on every process).
        shard: where this process's rows sit in the global set.
        salt: varies the tie-breaking bits from one call to the next.
        track_moves: also return which local rows moved where.
    """
    device = points.device
    targets, donors = _choose_donors(counts.cpu().numpy(), rng)
    empty_result = SplitOutcome(0, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    if len(targets) == 0:
        return empty_result
    n_pairs, dim = len(targets), points.shape[1]
    targets_t = torch.from_numpy(targets).to(device)
    donors_t = torch.from_numpy(donors).to(device)
    bases = centroids[donors_t]
    signs = torch.where(torch.arange(dim, device=device) % 2 == 0, 1.0, -1.0)
    directions = bases * signs
    flat = directions.abs().amax(1) == 0  # a zero centroid: perturb along the sign pattern
    directions[flat] = signs
    pair_of = torch.full((len(centroids),), -1, dtype=torch.int64, device=device)
    pair_of[donors_t] = torch.arange(n_pairs, device=device)
    moved_sums = torch.zeros(n_pairs, dim, dtype=torch.float64, device=device)
    moved_counts = torch.zeros(n_pairs, dtype=torch.float64, device=device)
    moved_rows, moved_pairs = [], []
    for start in range(0, len(points), PASS_ROWS):
        pairs = pair_of[labels[start:start + PASS_ROWS]]
        members = torch.nonzero(pairs >= 0).flatten()
        if len(members) == 0:
            continue
        pairs = pairs[members]
        block = points[start:start + PASS_ROWS][members]
        # Nearer to base + eps*dir than to base - eps*dir  <=>  (x - base).dir > 0.
        side = ((block - bases[pairs]) * directions[pairs]).sum(1)
        to_target = side > 0
        tied = side == 0  # duplicates of the donor centroid: a fixed pseudo-random half
        if tied.any():
            to_target[tied] = tie_bits(members[tied] + start + shard.offset, salt)
        moving = torch.nonzero(to_target).flatten()
        moved_sums.index_add_(0, pairs[moving], block[moving].double())
        moved_counts.index_add_(0, pairs[moving], torch.ones(len(moving), dtype=torch.float64, device=device))
        if track_moves:
            moved_rows.append(members[moving] + start)
            moved_pairs.append(pairs[moving])
    # One collective for all splits of the round: [sums | count] per pair.
    packed = shard.all_reduce_sum(torch.cat([moved_sums, moved_counts[:, None]], 1))
    moved_sums, moved_counts = packed[:, :dim], packed[:, dim]
    donor_counts = counts[donors_t].double()
    valid = (moved_counts > 0) & (moved_counts < donor_counts)
    if valid.any():
        ok_targets, ok_donors = targets_t[valid], donors_t[valid]
        ok_moved, ok_sums = moved_counts[valid], moved_sums[valid]
        sums[ok_targets] = ok_sums
        sums[ok_donors] -= ok_sums
        counts[ok_targets] = ok_moved.long()
        counts[ok_donors] -= ok_moved.long()
        centroids[ok_targets] = (sums[ok_targets] / counts[ok_targets, None]).float()
        centroids[ok_donors] = (sums[ok_donors] / counts[ok_donors, None]).float()
    # A failed split (every point on one side) leaves the target as a perturbed copy.
    failed = ~valid
    if failed.any():
        centroids[targets_t[failed]] = bases[failed] + SPLIT_EPS * directions[failed]
    if track_moves and moved_rows:
        rows, pairs = torch.cat(moved_rows), torch.cat(moved_pairs)
        keep = valid[pairs]
        return SplitOutcome(int(valid.sum()), rows[keep], targets_t[pairs[keep]])
    return SplitOutcome(int(valid.sum()), empty_result.moved_rows, empty_result.moved_to)


def split_empty_clusters(points: np.ndarray, labels: np.ndarray, centroids: np.ndarray,
                         rng: np.random.Generator) -> int:
    """Re-seed the empty clusters of a labelling from non-empty ones, in place.

    Every cluster involved in a split ends at the mean of its points; the donors' points
    are divided between donor and target (``labels`` and ``centroids`` are modified).

    Args:
        points: ``(N, d)`` float32.
        labels: ``(N,)`` int64 cluster of every point.
        centroids: ``(k, d)`` float32; non-empty clusters are set to their means.
        rng: draws the donors.

    Returns:
        The number of empty clusters that were filled.
    """
    points_t = as_float32_tensor(points)
    labels_t = torch.from_numpy(labels)
    n_clusters = len(centroids)
    counts = torch.bincount(labels_t, minlength=n_clusters)
    sums = torch.zeros(n_clusters, points_t.shape[1], dtype=torch.float64).index_add_(0, labels_t, points_t.double())
    centroids_t = torch.from_numpy(centroids)
    filled = counts > 0
    centroids_t[filled] = (sums[filled] / counts[filled, None]).float()
    outcome = split_round(points_t, labels_t, centroids_t, counts, sums, rng, Shard(0, len(points), len(points)),
                          salt=0, track_moves=True)
    labels_t[outcome.moved_rows] = outcome.moved_to
    return outcome.n_split


# ------------------------------------------------------------------------------ Lloyd


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
    partial: torch.Tensor | None  # (k, d) float32, CPU only
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
    """Assignment passes over the points: nearest centroid, per-cluster sums, objective.

    On a CPU, ``n_workers`` threads each take every ``n_workers``-th block of rows (a
    static split, so the order of additions, hence the result, does not depend on timing)
    and run torch and faiss single-threaded on it; each keeps float32 partial sums of the
    blocks it assigned, flushed into its float64 sums every ``FLUSH_ROWS`` rows. On a GPU
    one thread walks large blocks and sums in float64 directly.
    """

    def __init__(self, points: torch.Tensor, backend: str, device: torch.device, n_clusters: int,
                 n_workers: int, accumulate: bool = True, keep_distances: bool = False):
        self.points = points
        self.accumulate = accumulate
        self.distances = torch.empty(len(points), device=points.device) if keep_distances else None
        on_gpu = points.device.type == "cuda" or device.type == "cuda"
        self.n_workers = 1 if on_gpu else max(1, n_workers)
        if not on_gpu:
            self.rows = cpu_block_rows(backend, n_clusters)
        else:
            self.rows = block_rows(n_clusters, device) if backend == "torch" else 65536
        self.labels = torch.empty(len(points), dtype=torch.int64, device=points.device)
        self.squared_norms = None
        if backend == "torch":  # ||x||^2 once, not once per iteration
            self.squared_norms = torch.cat([(block * block).sum(1) for block in points.split(PASS_ROWS)]) \
                if len(points) else torch.empty(0, device=points.device)
        dim = points.shape[1]
        self.workers = []
        for _ in range(self.n_workers):
            sums = torch.zeros(n_clusters if accumulate else 0, dim, dtype=torch.float64, device=points.device)
            partial = torch.zeros_like(sums, dtype=torch.float32) if accumulate and not on_gpu else None
            self.workers.append(_Worker(make_search(backend, device), sums, partial))
        self.pool = ThreadPoolExecutor(self.n_workers, initializer=_single_threaded_worker) \
            if self.n_workers > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def run(self, centroids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Assign every point to its nearest of ``centroids`` (labels in ``self.labels``).

        Returns:
            ``(k, d)`` float64 sums of the points of each cluster (empty when not
            accumulating) and their summed squared distance, over this process's points.
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
            worker.total += float(distances.sum(dtype=torch.float64))
            if not self.accumulate:
                continue
            if worker.partial is None:
                worker.sums.index_add_(0, labels, block.double())
                continue
            worker.partial.index_add_(0, labels, block)
            worker.pending += len(block)
            if worker.pending >= FLUSH_ROWS:
                worker.sums += worker.partial
                worker.partial.zero_()
                worker.pending = 0
        if worker.partial is not None and worker.pending:
            worker.sums += worker.partial


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


def kmeans(points: np.ndarray | torch.Tensor, n_clusters: int, n_iter: int = 20, seed: int = 0,
           backend: str = "faiss", init: str | np.ndarray = "random", device: str = "cpu", *,
           distributed: bool = False, n_threads: int | None = None,
           on_iteration: Callable[[int], None] | None = None) -> KMeansResult:
    """Cluster ``(N, d)`` points into ``n_clusters`` with Lloyd's algorithm.

    Runs exactly ``n_iter`` iterations, each: nearest centroid of every point (sizes and
    sums gathered in the same pass), centroid update, explicit split of empty clusters.
    The returned labels come from a last nearest-centroid search with the final centroids.

    Args:
        points: ``(N, d)`` array or tensor, converted to float32 once (a float32 CPU
            array is used without a copy; the torch backend on a GPU copies it there once).
        n_clusters: k, at most N (the global N with ``distributed``).
        n_iter: Lloyd iterations (0 returns the initial centroids' assignment).
        seed: seeds initialisation and splits; same seed, same result.
        backend: ``faiss`` or ``torch`` (nearest-centroid search).
        init: ``random``, ``kmeans++``, or a ``(k, d)`` array of starting centroids (the
            same on every process; e.g. last epoch's, or to compare implementations).
        device: ``cpu``, ``cuda[:n]`` or ``auto``: where the search runs.
        distributed: ``points`` is this process's contiguous shard of the data (rank 0
            holds the first rows); sizes and sums are all-reduced over the default
            process group. Without a process group this is the single-process run.
        n_threads: CPU worker threads (default: ``torch.get_num_threads()``); each runs
            the search and the sums of its share of the points single-threaded.
        on_iteration: called with the iteration number after each Lloyd iteration and
            with ``n_iter`` after the final assignment (progress bars); no effect on results.

    Returns:
        A :class:`KMeansResult`; with ``distributed``, assignments of the local points.

    Raises:
        ValueError: k < 1, k > N, n_iter < 0, or an unknown backend, init or device.
    """
    check_backend(backend)
    given_centroids = None if isinstance(init, str) else np.array(init, dtype=np.float32)
    if given_centroids is None and init not in INITS:
        raise ValueError(f"unknown k-means init {init!r}; choose one of: {', '.join(INITS)} or a (k, d) array")
    if n_iter < 0:
        raise ValueError(f"n_iter must be at least 0, got {n_iter}")
    run_device = resolve_device(device)
    points_t = as_float32_tensor(points)
    shard = Shard.of(len(points_t), distributed)
    if not 1 <= n_clusters <= shard.total:
        raise ValueError(f"n_clusters must be between 1 and the number of points ({shard.total}), got {n_clusters}")
    if backend == "torch":
        points_t = points_t.to(run_device)  # once: the search reads the points every iteration
    rng = np.random.default_rng(seed)
    if given_centroids is not None:
        if given_centroids.shape != (n_clusters, points_t.shape[1]):
            raise ValueError(f"init centroids must have shape (n_clusters, d) = ({n_clusters}, {points_t.shape[1]}), "
                             f"got {given_centroids.shape}")
        initial = given_centroids
    else:
        initial = init_centroids(points_t, n_clusters, init, rng, device=run_device, shard=shard)
    centroids = torch.from_numpy(initial).to(points_t.device)
    n_threads = n_threads or torch.get_num_threads()
    with cpu_threads(1):  # the worker threads parallelise; every op runs single-threaded
        return _lloyd(points_t, centroids, n_iter, seed, backend, run_device, shard, rng, n_threads, on_iteration)


def _lloyd(points_t: torch.Tensor, centroids: torch.Tensor, n_iter: int, seed: int, backend: str,
           run_device: torch.device, shard: Shard, rng: np.random.Generator, n_threads: int,
           on_iteration: Callable[[int], None] | None = None) -> KMeansResult:
    """The iterations of :func:`kmeans`, from initial ``centroids`` (modified in place)."""
    n_clusters = len(centroids)
    assigner = _Assigner(points_t, backend, run_device, n_clusters, n_threads)
    finder = _Assigner(points_t, backend, run_device, n_clusters, n_threads, accumulate=False)
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
            centroids[filled] = (sums[filled] / counts[filled, None]).float()
            outcome = split_round(points_t, assigner.labels, centroids, counts, sums, rng, shard,
                                  salt=seed * 1_000_003 + iteration)
            splits.append(outcome.n_split)
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
    return KMeansResult(finder.labels.cpu().numpy(), centroids.cpu().numpy(), objective, sum(splits), n_empty, splits)


__all__ = ["BACKENDS", "INITS", "KMeansResult", "init_centroids", "kmeans", "nearest_centroid", "predict",
           "split_empty_clusters"]
