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

from deepcluster import distributed, memory
from deepcluster.clustering import kmeans, labelling_centroids
from deepcluster.clustering.pca import PCA, StreamingPCA, fit_pca_sharded
from deepcluster.clustering.pic import pic
from deepcluster.clustering.search import faiss_has_gpu
from deepcluster.data import (ImageSource, PseudoLabelDataset, RandomResizedCropFlip, decode_problem,
                              uniform_cluster_sample)
from deepcluster.data.transforms import color_jitter
from deepcluster.features import Keep, Keeper, Kept, PassSettings, feature_pass, loader_kwargs
from deepcluster.health import check_features
from deepcluster.messages import plural
from deepcluster.methods import (STREAM_CLUSTERING, STREAM_FEATURE_ORDER, STREAM_SAMPLER, Method,
                                 Plan, derived_seed)
from deepcluster.models import Backbone, model_from_config
from deepcluster.models.heads import ClassifierHead, WithHead
from deepcluster.methods.records import epoch_record, final_record
from deepcluster.partition import Partition, TooFewDecoded
from deepcluster.progress import Progress
from deepcluster.run_files import SKIPPED_NAME

if TYPE_CHECKING:
    from deepcluster.config import Config


def clustering_device(config: Config, device: torch.device) -> str:
    """Where k-means and PIC searches run: ``clustering_device``, or with ``auto`` the
    training device (the CPU for the faiss backend when faiss is a CPU-only build)."""
    if config.clustering_device != "auto":
        return config.clustering_device
    if device.type == "cuda" and config.kmeans_backend == "faiss" and not faiss_has_gpu():
        return "cpu"
    return str(device)


def cluster_points(points: np.ndarray, decoded: np.ndarray, pca: PCA, config: Config, seed: int,
                   device: str = "cpu", previous: np.ndarray | None = None, start: int = 0) -> Partition:
    """k-means (or PIC) of the reduced unit rows whose ``decoded`` is true; one process is a
    world of one.

    ``points`` are this process's block of rows, from image ``start`` on (all ``N`` rows in
    one process); ``decoded`` and ``previous`` cover all ``N`` images. k-means runs sharded
    (sums and sizes all-reduced; every backend), PIC on the gathered points, and every
    process gets all ``N`` assignments. ``previous`` (last epoch's assignments) seeds
    k-means when ``carry_clusters`` is set; without it (the first epoch) ``kmeans_init``
    does. ``pca`` is only stored with the result (the projection
    that made ``points``)."""
    began = time.perf_counter()
    local = decoded[start:start + len(points)]
    usable = points if local.all() else points[local]  # no copy of the points when every image decoded
    if config.clustering == "pic":
        with Progress(None, "PIC"):
            found = pic(distributed.all_gather_rows(usable), knn_backend=config.kmeans_backend, device=device,
                        seed=seed)
        labels, n_clusters, centroids, objective, n_split = (found.assignments, found.n_clusters, found.centroids,
                                                             None, 0)
    else:
        init = config.kmeans_init
        if config.carry_clusters and previous is not None:
            init = labelling_centroids(usable, previous[start:start + len(points)][local], config.n_clusters, seed,
                                       shard=True)
        with Progress(config.kmeans_iters + 1, f"k-means k={config.n_clusters}") as bar:
            result = kmeans(usable, config.n_clusters, config.kmeans_iters, seed=seed, backend=config.kmeans_backend,
                            init=init, device=device, on_iteration=lambda _: bar.update(), shard=True)
        labels = distributed.all_gather_rows(result.assignments)
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
    PCA-whitening the feature pass streams into. Each process visits a contiguous block of
    the images and keeps its rows (k-means' sharded mode clusters them there); with
    ``pca_sample_size`` in a seeded random order, the PCA fitted on the first that many."""
    bounded = config.pca_sample_size is not None and config.pca_sample_size < n_images
    start, stop = distributed.block(n_images)
    indices = np.arange(start, stop)
    if bounded:
        order = np.random.default_rng(seed).permutation(n_images)
        indices = order[(order >= start) & (order < stop)]
    share = -(-config.pca_sample_size // distributed.world_size()) if bounded else len(indices)
    n_components, sharded = pca_dim_for(config.pca_dim, n_images), distributed.is_distributed()
    return indices, start, StreamingPCA(
        stop - start, n_components, config.whiten_power, sample_size=max(share, 2),
        gather_sample=distributed.all_gather_rows if sharded and bounded else None,
        fit=(lambda local: fit_pca_sharded(local, model.clustered_dim, n_components, config.whiten_power))
        if sharded and not bounded else None)


@torch.no_grad()
def reduce_features(model: Backbone, source: ImageSource, config: Config, device: torch.device,
                    seed: int, epoch: int = 0, keep: Keep | None = None,
                    before_batch: Callable[[], object] | None = None) -> ReducedFeatures:
    """THE feature pass (``features.feature_pass``) streamed into PCA-whitening and L2
    normalisation: only ``(N, pca_dim)`` is kept for k-means, besides what ``keep`` asks for
    (the online kNN's raw features). The PCA is fitted on every image's features, as the
    reference does, or with ``pca_sample_size`` on that many seeded draws, every later batch
    projected on arrival (ImageNet: 1.6 GB of sample instead of 21 GB).
    ``before_batch``: called before each batch (``faults.instrument``'s ``features`` point).

    Raises:
        TrainingDiverged: a feature is NaN or infinite (``epoch``, 0-based, is named).
    """
    model.eval()
    indices, start, reducer = pca_stream(model, config, len(source), seed)
    local_decoded = np.zeros(len(indices), dtype=bool)
    keeper = None if keep is None else Keeper(keep, indices, model.clustered_dim, model.body_dim)
    body = keep is not None and keep.body
    position, time_pca, began = 0, 0.0, time.perf_counter()

    def forward(batch: torch.Tensor) -> Any:
        if before_batch is not None:
            before_batch()
        return model.forward_clustered_and_body(batch) if body else model.forward_clustered(batch)

    def add(rows: np.ndarray, out: Any, decoded: np.ndarray) -> None:
        nonlocal position, time_pca
        out, body_out = out if body else (out, None)
        out = out.float().cpu().numpy()
        check_features(out, epoch)
        local_decoded[position:position + len(rows)] = decoded
        if keeper is not None:
            keeper.add(out, body_out)
        position += len(rows)
        tick = time.perf_counter()
        if decoded.any():
            reducer.add(out[decoded], rows[decoded] - start)
        time_pca += time.perf_counter() - tick

    with memory.stage("features"):  # with the PCA's streaming share
        feature_pass(forward, source, PassSettings.of_run(config, device), add, indices)
    mask = distributed.gather_in_order(local_decoded.astype(np.uint8), indices, len(source)).astype(bool)
    kept = None if keeper is None else keeper.result(mask)  # each process its share, in image order
    if mask.sum() < 2:  # no PCA to fit: the caller reports the images that did not decode
        return ReducedFeatures(np.zeros((reducer.n_rows, 0), dtype=np.float32), mask, None,
                               time.perf_counter() - began, time_pca, start, kept)
    tick = time.perf_counter()
    with Progress(None, "PCA-whitening"), memory.stage("pca"):
        reduced, pca = reducer.finish()
    time_pca += time.perf_counter() - tick
    return ReducedFeatures(reduced, mask, pca, time.perf_counter() - began - time_pca, time_pca, start, kept)


class V1Planner:
    """Plans the epochs of a v1 run.

    Args:
        config: the run's settings.
        device: where the network runs.
        source: the training images.

    Attributes:
        reduce, cluster: the feature pass into PCA-L2 and the clustering step it calls
            (``faults.instrument`` wraps them).
        partition: the clustering in effect (the last one made; kept with the checkpoint).
        bank: v1 keeps no memory bank (None).
    """

    bank = None

    def __init__(self, config: Config, device: torch.device, source: ImageSource, *_: Any) -> None:
        self.config, self.device, self.source = config, device, source
        self.reduce: Callable[..., ReducedFeatures] = reduce_features
        self.cluster: Callable[..., Partition] = cluster_points
        self.partition: Partition | None = None
        self.clustering_device = clustering_device(config, device)

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
        config, source = self.config, self.source
        order_seed = derived_seed(config.seed, epoch, STREAM_FEATURE_ORDER)
        reduced = self.reduce(model, source, config, self.device, order_seed, epoch, keep=keep)
        if skipped is not None:
            for index in np.flatnonzero(~reduced.decoded):
                skipped[source.name(int(index))] = decode_problem(source, int(index))
        needed = config.n_clusters if config.clustering == "kmeans" else 2
        if reduced.decoded.sum() < needed:
            raise TooFewDecoded(f"only {int(reduced.decoded.sum())} of {len(source)} images could be decoded, fewer "
                                f"than the {needed} clusters needed; the reasons are in "
                                f"{str(config.run_dir / SKIPPED_NAME)!r}")
        with memory.stage("kmeans"):
            partition = self.cluster(reduced.points, reduced.decoded, reduced.pca, config,
                                     derived_seed(config.seed, epoch, STREAM_CLUSTERING),
                                     self.clustering_device, previous, start=reduced.start)
        partition.time_pca = reduced.time_pca
        return reduced, partition

    def plan(self, model: Backbone, head: ClassifierHead, epoch: int, previous: np.ndarray | None,
             skipped: dict[str, str], keep: Keep | None = None) -> Plan:
        """Epoch ``epoch``'s (0-based) plan: a fresh clustering (every ``reassign_every``
        epochs, and always when there is no ``previous``: the last epoch's assignments), a
        head reset to its clusters, and the numbers of both; ``keep``: what the monitor asks
        the feature pass to keep.

        Raises:
            TooFewDecoded: fewer images decoded than clusters are needed.
        """
        config = self.config
        recluster = previous is None or epoch % config.reassign_every == 0
        reduced, assignments, times, n_split = None, previous, (0.0, 0.0, 0.0), 0
        if recluster:
            reduced, self.partition = self.cluster_images(model, epoch, previous, keep, skipped)
            assignments = self.partition.assignments
            if not config.carry_clusters or head.n_outputs != self.partition.n_clusters:
                head.reset(self.partition.n_clusters, self.device)
            times = (reduced.time_network, self.partition.time_pca, self.partition.time_kmeans)
            n_split = self.partition.n_split
        record = epoch_record(epoch, assignments, int(assignments.max()) + 1, previous if recluster else None, times,
                              n_split, None if self.partition is None else self.partition.objective)
        return monitored(Plan(assignments, record, fresh=recluster), reduced)

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


def monitored(plan: Plan, reduced: ReducedFeatures | None) -> Plan:
    """``plan`` with what the monitor reads of the feature pass: the clustered points and
    their PCA (one process only: with several, each holds its block) and the kept rows."""
    if reduced is not None:
        plan.points = None if distributed.is_distributed() else reduced.points
        plan.pca, plan.kept = reduced.pca, reduced.kept
    return plan


def build(config: Config, device: torch.device) -> tuple[Backbone, ClassifierHead, torch.optim.Optimizer]:
    """A fresh backbone on ``device``, its pseudo-label head (without a layer until the first
    clustering) and the body optimiser (SGD with momentum)."""
    torch.manual_seed(config.seed)
    model = model_from_config(config)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
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
    """An epoch of ``(image, pseudo-label, image index)`` batches: with the ``uniform``
    sampler each non-empty cluster gets the same share of the epoch (the paper's defence
    against trivial solutions); random-resized-crop and flip views."""
    assignments = plan.assignments
    usable = int((assignments >= 0).sum())
    rng = np.random.default_rng(derived_seed(config.seed, epoch, STREAM_SAMPLER))
    if config.sampler == "uniform":
        indices = uniform_cluster_sample(assignments, usable, rng)
    else:
        indices = rng.permutation(np.flatnonzero(assignments >= 0))
    # Drawn alike on every process, then cut into equal shares (no process waits in DDP for
    # one with a step more); each sample keeps its position in the whole list for its crop.
    indices, positions = distributed.equal_shard(indices)
    transform = RandomResizedCropFlip(config.crop, (config.crop_scale_min, 1.0), flip=config.hflip,
                                      color=color_jitter(config.color_jitter, config.grayscale_prob))
    dataset = PseudoLabelDataset(source, indices, assignments, transform, config.seed, epoch,
                                 positions if distributed.is_distributed() else None)
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


__all__ = ["METHOD", "Partition", "Plan", "ReducedFeatures", "TooFewDecoded", "V1Planner", "build", "size_problem",
           "cluster_points", "clustering_device", "pca_dim_for",
           "pseudo_label_loader", "reduce_features"]
