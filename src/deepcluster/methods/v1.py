"""DeepCluster v1's planner: feature pass -> PCA-whitening -> L2 -> k-means -> a new head.

Each epoch (DEEPCLUSTER.md section 2):

1. **Features.** The body, in eval mode, maps the centre view of every image to the
   output of its last fully connected layer before the ReLU (``reduce_features``, streamed
   through THE feature pass of ``deepcluster.features``).
2. **Clustering.** PCA-whitening to ``pca_dim``, L2 normalisation, k-means with a fresh
   seed (``cluster_points``); the assignments are the pseudo-labels (centroids kept only
   for prediction).
3. **A new head.** Cluster ids are arbitrary and change every epoch, so last epoch's head
   means nothing: the classifier head is re-created with k outputs.

The same chain (``cluster_images``) makes the final clustering of the trained network.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from deepcluster import distributed
from deepcluster.clustering import cluster_sizes, kmeans, nmi
from deepcluster.clustering.pca import PCA, StreamingPCA, fit_pca_sharded
from deepcluster.clustering.pic import pic
from deepcluster.clustering.search import faiss_has_gpu
from deepcluster.config import Config
from deepcluster.data import DataError, ImageSource, decode_problem
from deepcluster.features import PassSettings, compute_features, feature_pass
from deepcluster.health import check_features, cluster_warnings
from deepcluster.methods import (STREAM_CLUSTERING, STREAM_FEATURE_ORDER, STREAM_HEAD_SAMPLE, STREAM_SCORES,
                                 Plan, derived_seed)
from deepcluster.models import Backbone
from deepcluster.models.heads import ClassifierHead
from deepcluster.monitor import KnnMonitor, label_scores, measures_body, unwhitened
from deepcluster.progress import Progress
from deepcluster.runfolder import SKIPPED_NAME


@dataclass
class Partition:
    """One clustering of the images: a pseudo-label for every image (-1 where unusable).

    Attributes:
        assignments: ``(N,)`` int64 pseudo-label of every image.
        n_clusters: number of pseudo-labels (k for k-means; found by PIC).
        centroids: ``(n_clusters, pca_dim)`` cluster centres in the PCA space (for PIC,
            cluster means), to place new images.
        objective: mean squared distance to the centroid (k-means only).
        n_split: empty clusters re-seeded during k-means.
        pca: the projection fitted this epoch (None for v2, which clusters unit embeddings).
        time_pca: seconds spent fitting the PCA and projecting.
        time_kmeans: seconds spent in k-means (or PIC).
    """

    assignments: np.ndarray
    n_clusters: int
    centroids: np.ndarray
    objective: float | None
    n_split: int
    pca: PCA | None
    time_pca: float
    time_kmeans: float


def clustering_device(config: Config, device: torch.device) -> str:
    """Where k-means and PIC searches run: ``clustering_device``, or with ``auto`` the
    training device (the CPU for the faiss backend when faiss is a CPU-only build)."""
    if config.clustering_device != "auto":
        return config.clustering_device
    if device.type == "cuda" and config.kmeans_backend == "faiss" and not faiss_has_gpu():
        return "cpu"
    return str(device)


def previous_centroids(points: np.ndarray, previous: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """``(k, d)`` starting centroids for ``kmeans_init: previous``: the mean of this epoch's
    points under last epoch's clustering, so cluster k stays (mostly) cluster k; a cluster
    without a usable point starts at a random point."""
    usable = previous >= 0
    sums = np.zeros((n_clusters, points.shape[1]), dtype=np.float64)
    np.add.at(sums, previous[usable], points[usable])
    counts = np.bincount(previous[usable], minlength=n_clusters)
    empty = counts == 0
    sums[empty] = points[np.random.default_rng(seed).choice(len(points), int(empty.sum()), replace=False)]
    counts[empty] = 1
    return (sums / counts[:, None]).astype(np.float32)


def sharded_previous_centroids(points: np.ndarray, previous: np.ndarray, n_clusters: int,
                               seed: int) -> np.ndarray:
    """``previous_centroids`` with the usable points spread over processes in rank order
    (``points``, ``previous``: this process's): the sums and counts are all-reduced, and a
    cluster without a point starts at the same random point of the global set as in one
    process."""
    usable = previous >= 0
    sums = np.zeros((n_clusters, points.shape[1] + 1), dtype=np.float64)
    np.add.at(sums[:, :-1], previous[usable], points[usable])
    sums[:, -1] = np.bincount(previous[usable], minlength=n_clusters)
    sums = distributed.all_reduce_sum(torch.from_numpy(sums)).numpy()
    counts = sums[:, -1].copy()
    sums = sums[:, :-1]
    empty = counts == 0
    sizes = distributed.all_gather_ints(len(points))
    offset = sum(sizes[:distributed.rank()])
    chosen = np.random.default_rng(seed).choice(sum(sizes), int(empty.sum()), replace=False)
    picked = np.zeros((len(chosen), points.shape[1]), dtype=np.float64)
    mine = (chosen >= offset) & (chosen < offset + len(points))
    picked[mine] = points[chosen[mine] - offset]
    sums[empty] = distributed.all_reduce_sum(torch.from_numpy(picked)).numpy()
    counts[empty] = 1
    return (sums / counts[:, None]).astype(np.float32)


def cluster_points(points: np.ndarray, decoded: np.ndarray, pca: PCA, config: Config, seed: int,
                   device: str = "cpu", previous: np.ndarray | None = None, start: int = 0) -> Partition:
    """k-means (or PIC) of the reduced ``(N, pca_dim)`` unit rows whose ``decoded`` is true.

    ``previous`` (last epoch's assignments) seeds k-means when ``kmeans_init`` is
    ``previous``; without it (the first epoch) that init falls back to random points.
    ``pca`` is only stored with the result (the projection that made ``points``).

    With several processes, ``points`` are this process's block of rows, from image
    ``start`` on (``decoded`` and ``previous`` cover all ``N``): k-means runs in its sharded
    mode (sums and sizes all-reduced; every backend), PIC on the gathered points, and every
    process gets all ``N`` assignments."""
    if distributed.is_distributed():
        return _cluster_sharded(points, decoded, pca, config, seed, device, previous, start)
    start = time.perf_counter()
    usable = points[decoded] if not decoded.all() else points
    init = config.kmeans_init
    if init == "previous":
        init = ("random" if previous is None
                else previous_centroids(usable, previous[decoded], config.n_clusters, seed))
    if config.clustering == "pic":
        with Progress(None, "PIC"):
            found = pic(usable, knn_backend=config.kmeans_backend, device=device, seed=seed)
        labels, n_clusters, centroids, objective, n_split = (found.assignments, found.n_clusters, found.centroids,
                                                             None, 0)
    else:
        with Progress(config.kmeans_iters + 1, f"k-means k={config.n_clusters}") as bar:
            result = kmeans(usable, config.n_clusters, config.kmeans_iters, seed=seed,
                            backend=config.kmeans_backend, init=init, device=device,
                            on_iteration=lambda _: bar.update())
        labels, n_clusters, centroids, objective, n_split = (result.assignments, config.n_clusters, result.centroids,
                                                             result.objective[-1], result.n_split)
    time_kmeans = time.perf_counter() - start
    assignments = np.full(len(points), -1, dtype=np.int64)
    assignments[decoded] = labels
    return Partition(assignments, n_clusters, centroids, objective, n_split, pca, 0.0, time_kmeans)


def _cluster_sharded(points: np.ndarray, decoded: np.ndarray, pca: PCA, config: Config, seed: int, device: str,
                     previous: np.ndarray | None, start: int) -> Partition:
    """``cluster_points`` over a process group (see there)."""
    began = time.perf_counter()
    local = decoded[start:start + len(points)]
    usable = points[local]
    if config.clustering == "pic":
        everything = distributed.all_gather_rows(usable)
        with Progress(None, "PIC"):
            found = pic(everything, knn_backend=config.kmeans_backend, device=device, seed=seed)
        labels, n_clusters, centroids, objective, n_split = (found.assignments, found.n_clusters, found.centroids,
                                                             None, 0)
    else:
        init = config.kmeans_init
        if init == "previous":
            init = ("random" if previous is None else sharded_previous_centroids(
                usable, previous[start:start + len(points)][local], config.n_clusters, seed))
        with Progress(config.kmeans_iters + 1, f"k-means k={config.n_clusters}") as bar:
            result = kmeans(usable, config.n_clusters, config.kmeans_iters, seed=seed,
                            backend=config.kmeans_backend, init=init, device=device,
                            on_iteration=lambda _: bar.update(), shard=True)
        labels = distributed.all_gather_rows(np.asarray(result.assignments, dtype=np.int64))
        n_clusters, centroids, objective, n_split = (config.n_clusters, result.centroids, result.objective[-1],
                                                     result.n_split)
    assignments = np.full(len(decoded), -1, dtype=np.int64)
    assignments[decoded] = labels
    return Partition(assignments, n_clusters, centroids, objective, n_split, pca, 0.0, time.perf_counter() - began)


def pca_dim_for(pca_dim: int, n_images: int) -> int:
    """The PCA width used for ``n_images`` images: ``pca_dim``, or half the images when
    there are too few. Whitened to ``N - 1`` or more dimensions, ``N`` points are all equally
    far apart (a regular simplex), so k-means can only split them at random."""
    return pca_dim if n_images > pca_dim + 1 else max(1, (n_images - 1) // 2)


@dataclass
class ReducedFeatures:
    """One feature pass, reduced for clustering.

    Attributes:
        points: ``(n, pca_dim)`` float32 unit rows of images ``start .. start + n - 1``
            (all ``N`` in one process; this process's block with several), zero for
            unusable images; no columns when fewer than two images decoded.
        decoded: ``(N,)`` bool, the images that decoded.
        pca: the fitted PCA (``None`` when fewer than two images decoded).
        time_network: seconds in the network.
        time_pca: seconds in the PCA (fit and projections).
        kept: ``(n, feature_dim)`` raw features of the ``keep`` images this process
            visited (all of them in one process), in image order (None without ``keep``).
        kept_rows: ``(n,)`` their image indices, ascending.
        keep: the ``(N,)`` bool mask the pass was given.
        start: the first image of ``points``.
        kept_body: ``(n, body_dim)`` the pooled body of the same images, when the pass was
            asked for it (``keep_body``), else None.
    """

    points: np.ndarray
    decoded: np.ndarray
    pca: PCA | None
    time_network: float
    time_pca: float
    kept: np.ndarray | None = None
    kept_rows: np.ndarray | None = None
    keep: np.ndarray | None = None
    start: int = 0
    kept_body: np.ndarray | None = None

    def local_raw(self, rows: np.ndarray, body: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """This process's share of the raw features (with ``body``, of the pooled body) of
        the ``(N,)`` bool ``rows`` (a subset of ``keep``) and their image indices, ascending:
        every one of them in one process."""
        mine = rows[self.kept_rows]
        return (self.kept_body if body else self.kept)[mine], self.kept_rows[mine]

    def raw(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw features and decoded flags of the ``(N,)`` bool ``rows`` (a subset of ``keep``),
        in image order, on every process (for a bounded sample, such as a head's)."""
        features, indices = distributed.gather_sorted(*self.local_raw(rows))
        return features, self.decoded[indices]


@torch.no_grad()
def reduce_features(model: Backbone, source: ImageSource, config: Config, device: torch.device,
                    seed: int, epoch: int = 0, keep: np.ndarray | None = None,
                    before_batch: Callable[[], object] | None = None, keep_body: bool = False) -> ReducedFeatures:
    """The feature pass streamed into PCA-whitening and L2 normalisation.

    Only ``(N, pca_dim)`` is kept for k-means. With ``pca_sample_size`` unset the PCA is
    fitted on every image's features, as the reference does (holding ``N x D`` until the
    fit); with it set, the images are visited in a seeded random order, the PCA is fitted on
    the first ``pca_sample_size`` of them and every later batch is projected on arrival,
    so memory stays bounded (ImageNet: 1.6 GB of sample instead of 21 GB).

    Args:
        keep: ``(N,)`` bool, images whose raw features are also returned (``kept``), e.g.
            the online kNN's memory; None keeps none.
        keep_body: with ``keep``, also return those images' pooled body (``kept_body``),
            computed in the same pass.
        before_batch: called before the network sees each batch (``faults.instrument``
            injects its ``features`` point here).

    Raises:
        TrainingDiverged: a feature is NaN or infinite (``epoch``, 0-based, is named).
    """
    model.eval()
    n_images = len(source)
    bounded = config.pca_sample_size is not None and config.pca_sample_size < n_images
    # Each process visits a contiguous block of the images (in the seeded order when the
    # PCA is fitted on a sample) and keeps its rows: k-means' sharded mode clusters them there.
    start, stop = distributed.block(n_images)
    if bounded:
        order = np.random.default_rng(seed).permutation(n_images)
        indices = order[(order >= start) & (order < stop)]
    else:
        indices = np.arange(start, stop)
    share = -(-config.pca_sample_size // distributed.world_size()) if bounded else len(indices)
    n_components = pca_dim_for(config.pca_dim, n_images)
    sharded = distributed.is_distributed()
    reducer = StreamingPCA(stop - start, n_components, config.whiten_power, sample_size=max(share, 2),
                           gather_sample=distributed.all_gather_rows if sharded and bounded else None,
                           fit=(lambda local: fit_pca_sharded(local, model.clustered_dim, n_components,
                                                              config.whiten_power)) if sharded and not bounded else None)
    local_decoded = np.zeros(len(indices), dtype=bool)
    keep_local = None if keep is None else keep[indices]
    kept_local = None if keep is None else np.zeros((int(keep_local.sum()), model.clustered_dim), dtype=np.float32)
    keep_body = keep_body and keep is not None
    body_local = np.zeros((len(kept_local), model.body_dim), dtype=np.float32) if keep_body else None
    kept_position = 0
    position, time_pca = 0, 0.0
    began = time.perf_counter()

    def forward(batch: torch.Tensor) -> Any:
        if before_batch is not None:
            before_batch()
        return model.forward_clustered_and_body(batch) if keep_body else model.forward_clustered(batch)

    def add(rows: np.ndarray, out: Any, decoded: np.ndarray) -> None:
        nonlocal position, kept_position, time_pca
        if keep_body:
            out, body = out
        out = out.float().cpu().numpy()
        check_features(out, epoch)
        local_decoded[position:position + len(rows)] = decoded
        if keep_local is not None:
            wanted = keep_local[position:position + len(rows)]
            kept_local[kept_position:kept_position + int(wanted.sum())] = out[wanted]
            if keep_body:
                body_local[kept_position:kept_position + int(wanted.sum())] = body.float().cpu().numpy()[wanted]
            kept_position += int(wanted.sum())
        position += len(rows)
        tick = time.perf_counter()
        if decoded.any():
            reducer.add(out[decoded], rows[decoded] - start)
        time_pca += time.perf_counter() - tick

    feature_pass(forward, source, PassSettings.of_run(config, device), add, indices)
    mask = distributed.gather_in_order(local_decoded.astype(np.uint8), indices, n_images).astype(bool)
    # Each process keeps its share of the kept rows, in image order (no process holds them all).
    kept, kept_rows, kept_body = None, None, None
    if keep is not None:
        kept_rows = indices[keep_local]
        order = np.argsort(kept_rows, kind="stable")
        kept, kept_rows = kept_local[order], kept_rows[order]
        kept_body = None if body_local is None else body_local[order]
    if mask.sum() < 2:  # no PCA to fit: the caller reports the images that did not decode
        return ReducedFeatures(np.zeros((stop - start, 0), dtype=np.float32), mask, None,
                               time.perf_counter() - began, time_pca, kept, kept_rows, keep, start, kept_body)
    tick = time.perf_counter()
    with Progress(None, "PCA-whitening"):
        reduced, pca = reducer.finish()
    time_pca += time.perf_counter() - tick
    return ReducedFeatures(reduced, mask, pca, time.perf_counter() - began - time_pca, time_pca, kept, kept_rows, keep,
                           start, kept_body)


def class_points(reduced: ReducedFeatures | None) -> np.ndarray | None:
    """The clustered points with their whitening undone (``monitor.unwhitened``), for the
    label scores' k = number of classes accuracy (``cluster_acc``), or None: without a
    feature pass, and with several processes, which hold only their own block (the scores
    from the assignments alone remain)."""
    if reduced is None or distributed.is_distributed():
        return None
    return unwhitened(reduced.points, reduced.pca)


def union(*masks: np.ndarray | None) -> np.ndarray | None:
    """Element-wise OR of the masks that are not None (None when all are)."""
    given = [m for m in masks if m is not None]
    return None if not given else np.logical_or.reduce(given)


# head_init "centroids": rows whose features set the new head (enough for 20 per cluster),
# and the temperature of its logits (v2's).
HEAD_SAMPLE_MIN, HEAD_SAMPLE_PER_CLUSTER, HEAD_TEMPERATURE = 50_000, 20, 0.1


def head_sample(n_images: int, n_clusters: int, seed: int) -> np.ndarray:
    """``(N,)`` bool: the images whose features set a ``centroids`` head (all of a small set)."""
    size = min(n_images, max(HEAD_SAMPLE_MIN, HEAD_SAMPLE_PER_CLUSTER * n_clusters))
    mask = np.zeros(n_images, dtype=bool)
    mask[np.random.default_rng(seed).choice(n_images, size, replace=False) if size < n_images else slice(None)] = True
    return mask


@torch.no_grad()
def init_head_from_clusters(head: nn.Linear, features: np.ndarray, assignments: np.ndarray,
                            temperature: float = HEAD_TEMPERATURE, head_std: float = 0.01) -> None:
    """Start a new head as a nearest-cluster-mean classifier (``head_init: centroids``).

    The head reads ``h = relu(f)``. Row k becomes the direction from the mean of ``h`` to
    the mean of cluster k, scaled so the logits are about cos(h - mean, direction) / T
    (T = 0.1, v2's temperature), but at most 1 / T times the norm of a random row of std
    ``head_std`` (the model's); the bias subtracts the mean. So the first step already
    predicts the pseudo-labels and its gradient teaches the body instead of a random head
    (the reference starts from N(0, 0.01) and must learn the head first, a few hundred
    steps of every epoch, which is most of an epoch on a small set). Clusters without a
    sampled image keep their random row.

    Args:
        head: ``Linear(feature_dim, k)``, changed in place.
        features: ``(n, feature_dim)`` raw features (before the ReLU) of sampled images.
        assignments: ``(n,)`` their clusters in ``[0, k)``.
    """
    h = torch.relu(torch.from_numpy(features)).double()
    labels = torch.from_numpy(assignments).long()
    mean = h.mean(dim=0)
    scale = (h - mean).norm(dim=1).mean().clamp_min(1e-12)
    sums = torch.zeros(head.out_features, h.shape[1], dtype=torch.float64).index_add_(0, labels, h)
    counts = torch.bincount(labels, minlength=head.out_features)
    present = counts > 0
    direction = sums[present] / counts[present, None] - mean
    # Capped so tiny features (a narrow net under the reference init) do not get a huge head
    # whose gradient would throw the body off: at most 1 / T times a reference row's norm.
    norm = min(1.0 / (temperature * float(scale)), math.sqrt(h.shape[1]) * head_std / temperature)
    weight = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12) * norm
    head.weight[present] = weight.to(head.weight)
    head.bias[present] = -(weight @ mean).to(head.bias)


def knn_scores(model: Backbone, monitor: KnnMonitor, reduced: ReducedFeatures, config: Config,
               device: torch.device) -> dict[str, float]:
    """Online kNN of the validation images: their feature pass, against the memory rows
    the epoch's feature pass kept (``reduced.kept``; each process its own share); also on
    the pooled body when the pass kept it (``knn_body_top1``)."""
    body = reduced.kept_body is not None or (monitor.memory is None and measures_body(model, config, monitor))
    val_features, val_decoded, val_body = compute_features(model, monitor.val, config, device, body=body)
    if monitor.memory is None:
        return monitor.score_with_body((val_features, val_body), val_decoded, None, None, device)
    memory, rows = reduced.local_raw(monitor.memory)
    decoded = reduced.decoded[rows]
    memory_body = reduced.local_raw(monitor.memory, body=True)[0][decoded] if body else None
    return monitor.score_with_body((val_features, val_body), val_decoded, (memory[decoded], memory_body),
                                   monitor.train_labels[rows[decoded]], device)



class TooFewDecoded(DataError):
    """Fewer images decoded than the clustering needs (the run writes ``skipped.tsv`` first)."""


class V1Planner:
    """Plans the epochs of a v1 run.

    Args:
        config: the run's settings.
        device: where the network runs.
        source: the training images.
        monitor: the online kNN, or None.

    Attributes:
        reduce, cluster: the feature pass into PCA-L2 and the clustering step it calls
            (``faults.instrument`` wraps them).
        partition: the clustering in effect (the last one made; kept with the checkpoint).
        training_numbers: what the training pass adds to the epoch's record (nothing for v1).
    """

    def __init__(self, config: Config, device: torch.device, source: ImageSource,
                 monitor: KnnMonitor | None = None) -> None:
        self.config, self.device, self.source, self.monitor = config, device, source, monitor
        self.reduce: Callable[..., ReducedFeatures] = reduce_features
        self.cluster: Callable[..., Partition] = cluster_points
        self.partition: Partition | None = None
        self.training_numbers: dict[str, Any] = {}  # v1's training pass adds nothing to the log

    def checkpoint_entries(self) -> dict[str, Any]:
        """What the checkpoint keeps of the clustering in effect: its centroids and PCA (what
        ``assign`` uses when the run has no final clustering)."""
        if self.partition is None:
            return {}
        return {"centroids": torch.from_numpy(self.partition.centroids),
                "pca_mean": torch.from_numpy(self.partition.pca.mean),
                "pca_projection": torch.from_numpy(self.partition.pca.projection)}

    def load_state(self, saved: dict[str, Any]) -> None:
        """Nothing to restore: every epoch of v1 clusters afresh (``previous`` comes with the run state)."""

    def cluster_images(self, model: Backbone, epoch: int, previous: np.ndarray | None = None,
                       keep: np.ndarray | None = None, skipped: dict[str, str] | None = None,
                       keep_body: bool = False) -> tuple[ReducedFeatures, Partition]:
        """Features -> PCA-whitening -> L2 -> k-means (or PIC) of every image, seeded by ``epoch``.

        Args:
            previous: last epoch's assignments (``kmeans_init: previous``).
            keep: images whose raw features the pass also returns.
            skipped: path -> reason; images that did not decode are added.
            keep_body: also return the ``keep`` images' pooled body.

        Raises:
            TooFewDecoded: fewer images decoded than clusters are needed.
        """
        config, source = self.config, self.source
        order_seed = derived_seed(config.seed, epoch, STREAM_FEATURE_ORDER)
        reduced = self.reduce(model, source, config, self.device, order_seed, epoch, keep=keep, keep_body=keep_body)
        if skipped is not None:
            for index in np.flatnonzero(~reduced.decoded):
                skipped[source.name(int(index))] = decode_problem(source, int(index))
        needed = config.n_clusters if config.clustering == "kmeans" else 2
        if reduced.decoded.sum() < needed:
            raise TooFewDecoded(f"only {int(reduced.decoded.sum())} of {len(source)} images could be decoded, fewer "
                                f"than the {needed} clusters needed; the reasons are in "
                                f"{str(config.run_dir / SKIPPED_NAME)!r}")
        partition = self.cluster(reduced.points, reduced.decoded, reduced.pca, config,
                                 derived_seed(config.seed, epoch, STREAM_CLUSTERING),
                                 clustering_device(config, self.device), previous, start=reduced.start)
        partition.time_pca = reduced.time_pca
        return reduced, partition

    def plan(self, model: Backbone, head: ClassifierHead, epoch: int, previous: np.ndarray | None,
             skipped: dict[str, str]) -> Plan:
        """Epoch ``epoch``'s (0-based) plan: a fresh clustering (every ``reassign_every``
        epochs, and always when there is no ``previous``), a head reset to its clusters,
        and the numbers of both.

        Args:
            previous: the last epoch's assignments, or None.
            skipped: path -> reason of the files left out; this epoch's undecodable ones are added.

        Raises:
            TooFewDecoded: fewer images decoded than clusters are needed.
        """
        config, monitor = self.config, self.monitor
        record: dict[str, Any] = {"epoch": epoch + 1}  # counted from 1 wherever a person reads it
        recluster = previous is None or epoch % config.reassign_every == 0
        record.update(time_features=0.0, time_pca=0.0, time_kmeans=0.0, n_split=0)
        reduced, measure_knn = None, False
        if recluster:
            measure_knn = monitor is not None and (epoch % config.val_every == 0 or epoch == config.epochs - 1)
            head_rows = (head_sample(len(self.source), config.n_clusters,
                                     derived_seed(config.seed, epoch, STREAM_HEAD_SAMPLE))
                         if config.head_init == "centroids" else None)
            reduced, self.partition = self.cluster_images(
                model, epoch, previous, keep=union(monitor.memory if measure_knn else None, head_rows),
                skipped=skipped,
                keep_body=measure_knn and self.keeps_body(model))
            assignments = self.partition.assignments
            if config.head_reset or head.n_outputs != self.partition.n_clusters:
                head.reset(self.partition.n_clusters, self.device)
            if head_rows is not None:
                features, decoded = reduced.raw(head_rows)
                init_head_from_clusters(head.linear, features[decoded], assignments[head_rows][decoded],
                                        head_std=head.std)
            record.update(time_features=reduced.time_network, time_pca=self.partition.time_pca,
                          time_kmeans=self.partition.time_kmeans, n_split=self.partition.n_split)
        else:
            assignments = previous
        record["time_clustering"] = record["time_pca"] + record["time_kmeans"]
        sizes = cluster_sizes(assignments, int(assignments.max()) + 1)
        record.update(
            clustering_objective=None if self.partition is None else self.partition.objective,
            n_nonempty=sizes.n_nonempty,
            largest_cluster_share=sizes.largest_share,
            # Stability: only meaningful when a new clustering replaced the previous one.
            nmi_prev=nmi(previous, assignments) if recluster and previous is not None else None,
            warnings=cluster_warnings(assignments),
        )
        tick = time.perf_counter()
        record.update(label_scores(assignments, self.source.labels, class_points(reduced),
                                   derived_seed(config.seed, epoch, STREAM_SCORES), config.kmeans_backend))
        if recluster and measure_knn:
            record.update(knn_scores(model, monitor, reduced, config, self.device))
        record["time_monitor"] = time.perf_counter() - tick
        return Plan(assignments, record)

    def keeps_body(self, model: Backbone) -> bool:
        """Whether the feature pass keeps the pooled body of the online kNN's memory rows
        (the monitor has a memory and ``measures_body`` says yes)."""
        return self.monitor.memory is not None and measures_body(model, self.config, self.monitor)

    def final_clustering(self, model: Backbone, epochs: int, last: np.ndarray | None) -> tuple[Partition, dict]:
        """The trained network's clustering after ``epochs`` epochs (the same chain, seeded
        as an epoch ``epochs`` would be; with ``kmeans_init: previous`` started, as the epochs
        are, from the last epoch's clusters) and its numbers for ``final.json``.

        Args:
            last: the last epoch's assignments (for ``nmi_last_epoch``), or None.
        """
        config, monitor = self.config, self.monitor
        previous = last if config.kmeans_init == "previous" else None
        reduced, final = self.cluster_images(
            model, epochs, previous, keep=None if monitor is None else monitor.memory,
            keep_body=monitor is not None and self.keeps_body(model))
        sizes = cluster_sizes(final.assignments, final.n_clusters)
        summary = {"epoch": epochs, "clustering_objective": final.objective, "n_clusters": final.n_clusters,
                   "n_nonempty": sizes.n_nonempty, "largest_cluster_share": sizes.largest_share,
                   "nmi_last_epoch": None if last is None else nmi(last, final.assignments),
                   **label_scores(final.assignments, self.source.labels, class_points(reduced),
                                  derived_seed(config.seed, epochs, STREAM_SCORES), config.kmeans_backend),
                   **({} if monitor is None else knn_scores(model, monitor, reduced, config, self.device)),
                   "time_features": reduced.time_network, "time_clustering": final.time_pca + final.time_kmeans}
        return final, summary


__all__ = ["Partition", "Plan", "ReducedFeatures", "TooFewDecoded", "V1Planner", "cluster_points", "clustering_device",
           "head_sample", "init_head_from_clusters", "knn_scores", "pca_dim_for", "previous_centroids",
           "reduce_features"]
