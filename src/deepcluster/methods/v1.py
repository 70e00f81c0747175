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

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from deepcluster import distributed
from deepcluster.clustering import PCA, StreamingPCA, labelling_centroids
from deepcluster.data import PseudoLabelDataset, RandomResizedCropFlip, color_jitter
from deepcluster.features import Keeper, PassSettings, feature_pass, loader_kwargs
from deepcluster.health import check_features
from deepcluster.methods import STREAM_CLUSTERING, STREAM_FEATURE_ORDER, Method, Plan, derived_seed
from deepcluster.methods.common import (backbone, check_decoded, clustering_device, epoch_draw, kmeans_partition,
                                        stage)
from deepcluster.methods.records import clustering_record, final_record
from deepcluster.models.heads import ClassifierHead, WithHead

if TYPE_CHECKING:
    from deepcluster.config import Config
    from deepcluster.data import ImageSource
    from deepcluster.features import Keep, Kept
    from deepcluster.models import Backbone
    from deepcluster.partition import Partition


def cluster_points(points: np.ndarray, decoded: np.ndarray, pca: PCA, config: Config, seed: int,
                   device: str = "cpu", previous: np.ndarray | None = None, start: int = 0) -> Partition:
    """k-means of the reduced unit rows whose ``decoded`` is true; one process is a world of
    one.

    ``points`` are this process's block of rows, from image ``start`` on (all ``N`` rows in
    one process); ``decoded`` and ``previous`` cover all ``N`` images. k-means runs sharded
    (sums and sizes all-reduced; every backend) and every process gets all ``N``
    assignments. ``previous`` (last epoch's assignments) seeds k-means when
    ``carry_clusters`` is set; without it (the first epoch) ``kmeans_init`` does. ``pca`` is
    only stored with the result (the projection that made ``points``)."""
    local = decoded[start:start + len(points)]
    usable = points if local.all() else points[local]  # no copy of the points when every image decoded
    init = config.kmeans_init if previous is None or not config.carry_clusters else \
        carried_centroids(usable, previous[start:start + len(points)][local], config, seed)
    return kmeans_partition(usable, np.flatnonzero(local) + start, np.flatnonzero(decoded), len(decoded),
                            config.n_clusters, config.kmeans_iters, seed, f"k-means k={config.n_clusters}", pca,
                            backend=config.kmeans_backend, init=init, device=device)[0]


def carried_centroids(points: np.ndarray, previous: np.ndarray, config: Config, seed: int) -> np.ndarray:
    """``carry_clusters``: k-means starts from the means of last epoch's clusters (``previous``:
    the labels of ``points``)."""
    return labelling_centroids(points, previous, config.n_clusters, seed, shard=True)


def pic_points(points: np.ndarray, decoded: np.ndarray, pca: PCA, config: Config, seed: int,
               device: str = "cpu", previous: np.ndarray | None = None, start: int = 0) -> Partition:
    """``clustering: pic`` instead of k-means: PIC (``clustering.pic``) of every process's
    rows gathered, arguments as for :func:`cluster_points` (``previous`` is not used)."""
    from deepcluster.clustering.pic import pic
    from deepcluster.partition import Partition
    from deepcluster.progress import Progress

    began = time.perf_counter()
    local = decoded[start:start + len(points)]
    with Progress(None, "PIC"):
        found = pic(distributed.all_gather_rows(points if local.all() else points[local]),
                    knn_backend=config.kmeans_backend, device=device, seed=seed)
    assignments = np.full(len(decoded), -1, dtype=np.int64)
    assignments[decoded] = found.assignments
    return Partition(assignments, found.n_clusters, found.centroids, None, 0, pca, 0.0, time.perf_counter() - began)


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
        time_pca: seconds in the PCA (fit and projections, streamed ones included).
        start: the first image of ``points``.
        kept: the raw features the pass was asked to keep (``keep``), else None.
    """

    points: np.ndarray
    decoded: np.ndarray
    pca: PCA | None
    time_network: float
    time_pca: float
    start: int = 0
    kept: Kept | None = None


def pca_stream(model: Backbone, config: Config, n_images: int, seed: int) -> tuple[np.ndarray, int, StreamingPCA]:
    """The images this process visits, in order, the first image of its block, and the
    PCA-whitening the feature pass streams into, fitted on every image's features. Each
    process visits a contiguous block of the images and keeps its rows (k-means' sharded
    mode clusters them there)."""
    start, stop = distributed.block(n_images)
    n_components = pca_dim_for(config.pca_dim, n_images)
    if config.pca_sample_size is not None and config.pca_sample_size < n_images:
        return sampled_pca_stream(config, n_images, seed, n_components)
    fit = sharded_pca_fit(model, config, n_components) if distributed.is_distributed() else None
    return np.arange(start, stop), start, StreamingPCA(stop - start, n_components, config.whiten_power,
                                                       sample_size=max(stop - start, 2), fit=fit)


def sampled_pca_stream(config: Config, n_images: int, seed: int,
                       n_components: int) -> tuple[np.ndarray, int, StreamingPCA]:
    """:func:`pca_stream` with ``pca_sample_size``: each process's block in a seeded random
    order, the PCA fitted on the first ``pca_sample_size`` images (each process draws its
    share of them; the sample is gathered)."""
    start, stop = distributed.block(n_images)
    order = np.random.default_rng(seed).permutation(n_images)
    share = -(-config.pca_sample_size // distributed.world_size())
    gather = distributed.all_gather_rows if distributed.is_distributed() else None
    return order[(order >= start) & (order < stop)], start, StreamingPCA(
        stop - start, n_components, config.whiten_power, sample_size=max(share, 2), gather_sample=gather)


def sharded_pca_fit(model: Backbone, config: Config, n_components: int) -> Callable[[np.ndarray], Any]:
    """With several processes, the PCA fitted on every process's block (``fit_pca_sharded``)."""
    from deepcluster.clustering.pca import fit_pca_sharded

    return lambda local: fit_pca_sharded(local, model.clustered_dim, n_components, config.whiten_power)


@torch.no_grad()
def reduce_features(model: Backbone, source: ImageSource, config: Config, device: torch.device,
                    seed: int, epoch: int = 0, keep: Keep | None = None) -> ReducedFeatures:
    """THE feature pass (``features.feature_pass``) streamed into PCA-whitening and L2
    normalisation: only ``(N, pca_dim)`` is kept for k-means, besides what ``keep`` asks for
    (the online kNN's raw features). The PCA is fitted on every image's features, as the
    reference does, or with ``pca_sample_size`` on that many seeded draws, every later batch
    projected on arrival (ImageNet: 1.6 GB of sample instead of 21 GB).

    Raises:
        TrainingDiverged: a feature is NaN or infinite (``epoch``, 0-based, is named).
    """
    model.eval()
    indices, start, reducer = pca_stream(model, config, len(source), seed)
    network, keeper, began = model.forward_clustered, None, time.perf_counter()
    if keep is not None:  # the online kNN (``--val``): its rows of the raw features (and body) kept
        keeper = Keeper(keep, indices, model.clustered_dim, model.body_dim)
        network = model.forward_clustered_and_body if keep.body else network

    def add(rows: np.ndarray, out: Any, decoded: np.ndarray) -> None:
        out = (out if keeper is None else keeper.add(out)).float().cpu().numpy()
        check_features(out, epoch)
        if decoded.any():
            reducer.add(out[decoded], rows[decoded] - start)

    with stage("features"):  # with the PCA's streaming share (its covariance; ``reducer.seconds``)
        feature_pass(network, source, PassSettings.of_run(config, device), add, indices)
    mask = distributed.all_gather_rows(reducer.seen).astype(bool)  # decoded: fed to the PCA (blocks in image order)
    kept = None if keeper is None else keeper.result(mask)  # each process its share, in image order
    time_network = time.perf_counter() - began - reducer.seconds
    reduced, pca = np.zeros((reducer.n_rows, 0), dtype=np.float32), None  # no PCA to fit below two images
    if mask.sum() >= 2:  # (the caller reports the images that did not decode)
        with stage("pca", "PCA-whitening"):
            reduced, pca = reducer.finish()
    return ReducedFeatures(reduced, mask, pca, time_network, reducer.seconds, start, kept)


class V1Planner:
    """Plans the epochs of a v1 run.

    Args:
        config: the run's settings.
        device: where the network runs.
        source: the training images.

    Attributes:
        reduce, cluster: the feature pass into PCA-L2 and the clustering step it calls
            (k-means, or PIC with ``clustering: pic``; ``faults.instrument`` wraps them).
        partition: the clustering in effect (the last one made; kept with the checkpoint).
        bank: v1 keeps no memory bank (None).
    """

    bank = None

    def __init__(self, config: Config, device: torch.device, source: ImageSource, *_: Any) -> None:
        self.config, self.device, self.source = config, device, source
        self.reduce: Callable[..., ReducedFeatures] = reduce_features
        self.cluster: Callable[..., Partition] = cluster_points if config.clustering == "kmeans" else pic_points
        self.partition: Partition | None = None
        self.clustering_device = clustering_device(config, device, config.kmeans_backend)

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
                       keep: Keep | None = None, skipped: dict[str, str] | None = None
                       ) -> tuple[ReducedFeatures, Partition]:
        """Features -> PCA-whitening -> L2 -> k-means (or PIC) of every image, seeded by ``epoch``.

        Args:
            previous: last epoch's assignments (``carry_clusters``).
            keep: raw features the pass keeps as well.
            skipped: path -> reason; images that did not decode are added.

        Raises:
            TooFewDecoded: fewer images decoded than clusters are needed.
        """
        config = self.config
        reduced = self.reduce(model, self.source, config, self.device,
                              derived_seed(config.seed, epoch, STREAM_FEATURE_ORDER), epoch, keep=keep)
        needed = config.n_clusters if config.clustering == "kmeans" else 2
        if not reduced.decoded.all() or len(reduced.decoded) < needed:
            check_decoded(self.source, reduced.decoded, needed, "clusters needed", config, skipped)
        with stage("kmeans"):
            partition = self.cluster(reduced.points, reduced.decoded, reduced.pca, config,
                                     derived_seed(config.seed, epoch, STREAM_CLUSTERING),
                                     self.clustering_device, previous, start=reduced.start)
        partition.time_pca = reduced.time_pca
        return reduced, partition

    def plan(self, model: Backbone, head: ClassifierHead, epoch: int, previous: np.ndarray | None,
             skipped: dict[str, str], keep: Keep | None = None) -> Plan:
        """Epoch ``epoch``'s (0-based) plan: a fresh clustering, a head reset to its clusters,
        and the numbers of both; ``previous``: the last epoch's assignments (None at the
        start); ``keep``: what the monitor asks the feature pass to keep.

        Raises:
            TooFewDecoded: fewer images decoded than clusters are needed.
        """
        config = self.config
        if previous is not None and epoch % config.reassign_every:
            return self.kept_plan(epoch, previous)
        reduced, partition = self.cluster_images(model, epoch, previous, keep, skipped)
        if not (config.carry_clusters and head.n_outputs == partition.n_clusters):
            head.reset(partition.n_clusters, self.device)
        assignments, self.partition = partition.assignments, partition
        record = clustering_record(epoch, assignments, int(assignments.max()) + 1, previous,
                                   (reduced.time_network, partition.time_pca, partition.time_kmeans),
                                   partition.n_split, partition.objective)
        return monitored(Plan(assignments, record), reduced)

    def kept_plan(self, epoch: int, previous: np.ndarray) -> Plan:
        """The plan of an epoch between clusterings (``reassign_every`` above 1): last epoch's
        assignments and head, no feature pass."""
        record = clustering_record(epoch, previous, int(previous.max()) + 1, None, (0.0, 0.0, 0.0), 0,
                                   None if self.partition is None else self.partition.objective)
        return Plan(previous, record, fresh=False)

    def final_clustering(self, model: Backbone, epochs: int, last: np.ndarray | None,
                         keep: Keep | None = None) -> tuple[Partition, dict, Plan]:
        """The trained network's clustering after ``epochs`` epochs (the same chain, seeded
        as an epoch ``epochs`` would be; with ``carry_clusters`` started, as the epochs
        are, from the last epoch's clusters), its numbers for ``final.json`` and its plan (for
        the monitor).

        Args:
            last: the last epoch's assignments (for ``nmi_last_epoch``), or None.
            keep: what the monitor asks the feature pass to keep.
        """
        previous = last if self.config.carry_clusters else None
        reduced, final = self.cluster_images(model, epochs, previous, keep)
        summary = final_record(epochs, final, last, reduced.time_network)
        return final, summary, monitored(Plan(final.assignments, summary), reduced)


def monitored(plan: Plan, reduced: ReducedFeatures) -> Plan:
    """``plan`` with what the monitor reads of the feature pass: the clustered points and
    their PCA (one process only: with several, each holds its block) and the kept rows."""
    plan.points = None if distributed.is_distributed() else reduced.points
    plan.pca, plan.kept = reduced.pca, reduced.kept
    return plan


def build(config: Config, device: torch.device) -> tuple[Backbone, ClassifierHead, torch.optim.Optimizer]:
    """A fresh backbone on ``device``, its pseudo-label head (without a layer until the first
    clustering) and the body optimiser (SGD with momentum)."""
    model = backbone(config, device)
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return model, ClassifierHead.for_backbone(model), optimizer


def head_group(head: ClassifierHead, config: Config) -> dict:
    """The head's optimiser for an epoch, as a parameter group beside the body's: plain SGD
    (no momentum: the head is new every epoch) at ``head_lr`` (default ``lr``), not scheduled."""
    return {"params": list(head.parameters()), "lr": config.head_lr or config.lr, "momentum": 0.0,
            "dampening": 0.0, "nesterov": False, "weight_decay": config.weight_decay, "fixed_lr": True}


class OneCrop(nn.Module):
    """v1's training network in the loop's terms: ``[images] -> (None, [logits])``, one crop
    through the backbone and the one head."""

    def __init__(self, model: Backbone, head: ClassifierHead) -> None:
        super().__init__()
        self.network = WithHead(model, head)

    def forward(self, crops: list[torch.Tensor]) -> tuple[None, list[torch.Tensor]]:
        return None, [self.network(crops[0])]


def pseudo_label_loader(source: ImageSource, plan: Plan, config: Config, epoch: int,
                        device: torch.device) -> DataLoader:
    """An epoch of ``(image, pseudo-label, image index)`` batches (``common.epoch_draw``:
    with the ``uniform`` sampler each non-empty cluster gets the same share of the epoch);
    random-resized-crop and flip views, each crop seeded by its place in the draw."""
    indices, positions = epoch_draw(plan.assignments, config, epoch)
    transform = RandomResizedCropFlip(config.crop, (config.crop_scale_min, 1.0), flip=config.hflip,
                                      color=color_jitter(config.color_jitter, config.grayscale_prob))
    dataset = PseudoLabelDataset(source, indices, plan.assignments, transform, config.seed, epoch, positions)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, drop_last=False,
                      **loader_kwargs(config.workers, device))


def size_problem(config: Config, n_images: int) -> str | None:
    """What the data cannot satisfy of the settings, in one line (None: nothing): a k-means
    with more clusters than images."""
    if config.clustering == "kmeans" and config.n_clusters > n_images:
        return (f"setting 'n_clusters' is {config.n_clusters} but the data has only {n_images} "
                f"images; choose at most {n_images}")
    return None


def notes(config: Config, n_images: int) -> list[str]:
    """Warnings before the first epoch: a PCA too wide for the data."""
    if config.pca_dim <= pca_dim_for(config.pca_dim, n_images):
        return []
    from deepcluster.messages import plural

    return [f"deepcluster: warning: {plural(n_images, 'image')} are too few for pca_dim {config.pca_dim} "
            f"(whitened to N - 1 dimensions or more, the points are all equally far apart and k-means is "
            f"arbitrary); using {pca_dim_for(config.pca_dim, n_images)}"]


def clustering_text(config: Config) -> str:
    """How a v1 run clusters, in a few words."""
    if config.clustering == "kmeans":
        return f"{config.clustering}, k = {config.n_clusters}, PCA {config.pca_dim}"
    return f"{config.clustering}, PCA {config.pca_dim}"


METHOD = Method(name="v1", build=build, planner=V1Planner, loader=pseudo_label_loader, network=OneCrop,
                temperature=lambda config: 1.0, head_group=head_group, size_problem=size_problem,
                # v1's batch_size is per process
                global_batch=lambda config, processes: config.batch_size * processes,
                sync_batchnorm=False,  # the paper trained on one GPU
                describe=lambda config: f"k={config.n_clusters}", notes=notes, logs_heads=False,
                clustering_text=clustering_text,
                n_clusters=lambda config: config.n_clusters if config.clustering == "kmeans" else 0,
                cluster_settings=lambda config: {"n_clusters": config.n_clusters, "prototypes": None},
                assigns_by_prototypes=False)


__all__ = ["METHOD", "Plan", "ReducedFeatures", "V1Planner", "build", "size_problem", "cluster_points",
           "pca_dim_for", "pic_points", "pseudo_label_loader", "reduce_features"]
