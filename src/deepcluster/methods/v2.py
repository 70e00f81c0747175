"""DeepCluster-v2's planner, multi-crop data and network (SwAV paper; DEEPCLUSTER.md section 5).

Each epoch:

1. **Clustering** (``V2Planner.plan``): the memory bank holds, for every image, the
   L2-normalised embeddings of its two large crops as the previous epoch's training computed
   them; before epoch 0 one pass fills it (``memory_bank.fill_bank``), so no epoch trains without
   targets. Head h clusters the bank of crop h mod 2 by spherical k-means (``cluster_bank``);
   its prototypes are overwritten by the centroids and its assignments are the epoch's targets.
2. **Multi-crop data** (``multi_crop_loader``): a plain shuffle of the images (or uniform over
   head 0's clusters); each gives 2 large + V small crops, every crop carrying its targets.
3. **Training** (the one loop, ``deepcluster.train.train_one_epoch``): the backbone once per
   crop size, the projection, the prototypes' scores / temperature, cross-entropy averaged
   over heads; SGD or LARS at the step's rate of the warm-up + cosine schedule; the two large
   crops' embeddings go into the bank (``deepcluster.memory_bank``) for the next epoch's
   clustering.

The memory bank and the prototypes travel in the checkpoint, so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from deepcluster import distributed
from deepcluster.data import CropGroup, MultiCrop, MultiCropDataset, color_jitter
from deepcluster.features import loader_kwargs, local_features
from deepcluster.memory_bank import BANK_CROPS, MemoryBank, fill_bank
from deepcluster.methods import STREAM_CLUSTERING, Method, Plan, derived_seed
from deepcluster.methods.common import (backbone, check_decoded, clustering_device, epoch_draw, kmeans_partition,
                                        stage)
from deepcluster.methods.records import clustering_record, final_record
from deepcluster.models.projection import Embedder, MultiCropModel, PrototypeHead
from deepcluster.optim import LARS

if TYPE_CHECKING:
    from deepcluster.config import Config
    from deepcluster.data import ImageSource
    from deepcluster.features import Keep
    from deepcluster.models import Backbone
    from deepcluster.partition import Partition

# v2's setting ``empty_clusters`` -> the k-means' empty-cluster rule
EMPTY_RULE = {"keep": "keep", "split": "nudge"}
# Spherical k-means, as the reference's: cosine, random distinct points as first centroids
SPHERICAL = {"backend": "torch", "init": "randperm", "metric": "cosine"}


def build(config: Config, device: torch.device) -> tuple[Backbone, PrototypeHead, torch.optim.Optimizer]:
    """A fresh backbone, its projection and prototypes (``PrototypeHead``) on ``device``, and
    the optimiser of the backbone and projection (the prototypes are never trained): SGD, or
    LARS with ``optimizer: lars``."""
    model = backbone(config, device)
    head = PrototypeHead.for_backbone(model, config.projection_hidden, config.projection_dim, config.prototypes)
    head.to(device)
    trainable = [param for param in (*model.parameters(), *head.parameters()) if param.requires_grad]
    if config.optimizer == "lars":
        optimizer: torch.optim.Optimizer = LARS(trainable, lr=config.lr, momentum=config.momentum,
                                                weight_decay=config.weight_decay, trust=config.lars_trust,
                                                clip=config.lars_clip, exclude_1d=config.lars_exclude_1d)
    else:
        optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    return model, head, optimizer


def multi_crop(config: Config) -> MultiCrop:
    """The crops of one training image, as the settings describe them."""
    groups = tuple(CropGroup(size, count, (low, high)) for size, count, low, high in
                   zip(config.crop_sizes, config.crop_counts, config.crop_min_scales, config.crop_max_scales))
    return MultiCrop(groups, color=color_jitter(config.color_jitter, config.grayscale_prob), blur=config.blur_prob,
                     flip=config.hflip)


@dataclass
class BankClustering:
    """One epoch's clustering of the memory bank, one spherical k-means per head.

    Attributes:
        targets: ``(n_heads, N)`` int64 assignments (-1 for images without an embedding).
        centroids: per head, ``(k_h, dim)`` unit-norm float32 centroids (the new prototypes).
        objective: per head, the final mean cosine of the points with their centroid.
        n_empty: per head, clusters left without a point.
        n_split: per head, empty clusters re-seeded (``empty_clusters: split``).
        seconds: time spent.
    """

    targets: np.ndarray
    centroids: list[torch.Tensor]
    objective: list[float]
    n_empty: list[int]
    n_split: list[int]
    seconds: float


def cluster_bank(bank: MemoryBank, config: Config, epoch: int, device: torch.device | str = "cpu") -> BankClustering:
    """Spherical k-means of the bank for every head (``common.kmeans_partition`` with
    ``SPHERICAL``): head h clusters the embeddings of crop h mod 2 into ``prototypes[h]``
    clusters in ``kmeans_iters`` iterations (seeded by ``seed``, ``epoch`` and h). With
    several processes each clusters the rows it holds (sums and sizes all-reduced) and every
    process gets all assignments. ``empty_clusters``: ``keep`` (the reference) or ``split``
    (the ``nudge`` rule of :mod:`deepcluster.clustering.empty`).
    """
    start = time.perf_counter()
    rows, held, local = np.flatnonzero(bank.all_decoded()), np.flatnonzero(bank.decoded), bank.rows[bank.decoded]
    found = [kmeans_partition(bank.embeddings[head % BANK_CROPS, torch.from_numpy(held)].to(device), local, rows,
                              bank.n_images, count, config.kmeans_iters,
                              derived_seed(config.seed, epoch, STREAM_CLUSTERING, head), f"spherical k-means k={count}",
                              device=device, empty=EMPTY_RULE[config.empty_clusters], **SPHERICAL)
             for head, count in enumerate(config.prototypes)]
    results = [result for _, result in found]
    return BankClustering(np.stack([p.assignments for p, _ in found]), [torch.from_numpy(r.centroids) for r in results],
                          [r.objective[-1] for r in results], [r.n_empty for r in results],
                          [r.n_split for r in results], time.perf_counter() - start)


def multi_crop_loader(source: ImageSource, plan: Plan, config: Config, epoch: int,
                      device: torch.device) -> DataLoader:
    """An epoch of ``([crop batch, ...], (B, n_heads) targets, image index)`` batches
    (``common.epoch_draw`` over head 0's targets: a plain shuffle, ``sampler: shuffle``, as the
    reference, or uniform over its clusters); the last incomplete batch is dropped, as the
    reference does (a batch of one cannot pass the projection's BatchNorm)."""
    indices, positions = epoch_draw(plan.targets[0], config, epoch)
    dataset = MultiCropDataset(source, indices, plan.targets, multi_crop(config), config.seed, epoch,
                               positions=positions)
    return DataLoader(dataset, batch_size=config.batch_size // distributed.world_size(), shuffle=False,
                      drop_last=True, **loader_kwargs(config.workers, device))


def size_problem(config: Config, n_images: int) -> str | None:
    """What the data cannot satisfy of the settings, in one line (None: nothing): a head with
    more prototypes than images, a batch larger than the data, or a batch that does not split
    evenly over the processes."""
    largest = max(config.prototypes)
    if largest > n_images:
        return (f"setting 'prototypes' asks for {largest} prototypes in a head but the data has only "
                f"{n_images} images; choose at most {n_images} per head")
    if config.batch_size > n_images:
        return (f"setting 'batch_size' is {config.batch_size} but the data has only {n_images} images; v2 "
                f"drops an epoch's last incomplete batch (as the reference), so choose at most {n_images}")
    if config.batch_size % distributed.world_size():
        return (f"setting 'batch_size' ({config.batch_size}) is the global batch and must split evenly over "
                f"the {distributed.world_size()} processes")
    return None


class V2Planner:
    """Plans the epochs of a v2 run, and holds its memory bank (which the training pass writes).

    Args:
        config: the run's settings.
        device: where the network runs.
        source: the training images.
        head: the run's ``PrototypeHead`` (its projection makes the final clustering's embeddings).

    Attributes:
        reduce, cluster: the bank's first filling and the per-epoch clustering
            (``faults.instrument`` wraps them).
        bank: the memory bank (None until filled or restored).
    """

    def __init__(self, config: Config, device: torch.device, source: ImageSource, head: PrototypeHead) -> None:
        self.config, self.device, self.source, self.head = config, device, source, head
        self.reduce: Callable[..., MemoryBank] = fill_bank
        self.cluster: Callable[..., BankClustering] = cluster_bank
        self.bank: MemoryBank | None = None
        self.clustering_device = clustering_device(config, device, "torch")

    def checkpoint_entries(self) -> dict[str, Any]:
        """The whole memory bank, on the main process (the one that writes the checkpoint;
        the prototypes are in the head's weights). Every process calls it."""
        full = None if self.bank is None else self.bank.full()
        return {} if full is None else {"bank": full[0], "bank_decoded": torch.from_numpy(full[1])}

    def load_state(self, saved: dict[str, Any]) -> None:
        """Take the memory bank of a checkpoint.

        Raises:
            CheckpointError: it is missing or does not fit the run.
        """
        self.bank = MemoryBank.from_checkpoint(saved, len(self.source), self.config.projection_dim)  # this process's share

    def plan(self, model: Backbone, head: PrototypeHead, epoch: int, previous: np.ndarray | None,
             skipped: dict[str, str], keep: Keep | None = None) -> Plan:
        """Epoch ``epoch``'s (0-based) plan: the bank (filled first at the start of a run)
        clustered per head, the prototypes set to the centroids, and the numbers of both.

        Raises:
            TooFewDecoded: fewer images decoded than a head has prototypes.
        """
        config, time_features, filled = self.config, 0.0, self.bank is None
        if filled:  # the start of a run: the bank's first filling
            start = time.perf_counter()
            with stage("features"):
                self.bank = self.reduce(MultiCropModel(model, head.projection, head.prototypes), self.source,
                                        multi_crop(config), config, self.device)
            time_features = time.perf_counter() - start
        decoded = self.bank.all_decoded()
        if not decoded.all() or len(decoded) < max(config.prototypes):
            check_decoded(self.source, decoded, max(config.prototypes), "prototypes of a head", config,
                          skipped if filled else None)
        with stage("kmeans"):
            clustering = self.cluster(self.bank, config, epoch, self.clustering_device)
        for index, centroids in enumerate(clustering.centroids):
            head.prototypes.set(index, centroids)
        record = clustering_record(epoch, clustering.targets[0], config.prototypes[0], previous,
                                   (time_features, 0.0, clustering.seconds), sum(clustering.n_split), None,
                                   {"spherical_objective": clustering.objective, "n_empty": clustering.n_empty})
        # With several processes no one holds every embedding: the scores of the assignments remain.
        points = None if distributed.is_distributed() else self.bank.embeddings[0].numpy()
        return Plan(clustering.targets[0], record, clustering.targets, points=points, bank_rows=self.bank.sample)

    def final_clustering(self, model: Backbone, epochs: int, last: np.ndarray | None,
                         keep: Keep | None = None) -> tuple[Partition, dict, Plan]:
        """The trained network's clustering after ``epochs`` epochs: THE feature pass (centre
        view, eval mode) through backbone and projection, then head 0's spherical k-means
        (seeded as an epoch ``epochs`` would be), its numbers for ``final.json`` and its plan
        (for the monitor).

        Args:
            last: the last epoch's head-0 assignments (for ``nmi_last_epoch``), or None.
            keep: not used (the monitor makes its own pass of the training images).
        """
        config, source = self.config, self.source
        start = time.perf_counter()
        # Each process embeds and clusters its share of the images; only assignments travel.
        with stage("features"):
            embeddings, indices, decoded, _ = local_features(Embedder(model, self.head.projection), source, config,
                                                          self.device)
        time_features = time.perf_counter() - start
        rows = np.flatnonzero(distributed.gather_in_order(decoded.astype(np.uint8), indices, len(source)))
        count = config.prototypes[0]
        if len(rows) < count:
            from deepcluster.partition import TooFewDecoded

            raise TooFewDecoded(f"only {len(rows)} of {len(source)} images could be decoded for the final clustering, "
                                f"fewer than the {count} prototypes of head 0")
        with stage("kmeans"):
            final, result = kmeans_partition(
                torch.from_numpy(embeddings[decoded]).to(self.clustering_device), indices[decoded], rows, len(source),
                count, config.kmeans_iters, derived_seed(config.seed, epochs, STREAM_CLUSTERING, 0),
                f"spherical k-means k={count}", device=self.clustering_device,
                empty=EMPTY_RULE[config.empty_clusters], **SPHERICAL)
        final.objective = None  # v2's objective is the spherical one, logged apart
        summary = final_record(epochs, final, last, time_features,
                               {"spherical_objective": result.objective[-1], "n_empty": result.n_empty})
        return final, summary, Plan(final.assignments, summary, points=None if distributed.is_distributed() else embeddings)


def clusters_text(config: Config) -> str:
    """The clusters a v2 run makes, in a few words."""
    return f"v2 with prototypes {','.join(map(str, config.prototypes))}"


METHOD = Method(name="v2", build=build, planner=V2Planner, loader=multi_crop_loader,
                network=lambda model, head: MultiCropModel(model, head.projection, head.prototypes), temperature=lambda config: config.temperature,
                head_group=lambda head, config: None, size_problem=size_problem,
                global_batch=lambda config, processes: config.batch_size,  # v2's batch_size is already global
                sync_batchnorm=True,  # as SwAV's and solo-learn's multi-GPU runs
                describe=clusters_text, notes=lambda config, n_images: [], logs_heads=True,
                clustering_text=lambda config: (
                    f"v2: spherical k-means of the memory bank, heads of {','.join(map(str, config.prototypes))} "
                    f"prototypes on {config.projection_dim}-d embeddings (the clusters shown: head 0)"),
                n_clusters=lambda config: config.prototypes[0],
                cluster_settings=lambda config: {"n_clusters": None, "prototypes": list(config.prototypes)},
                assigns_by_prototypes=True)


__all__ = ["BANK_CROPS", "BankClustering", "METHOD", "MemoryBank", "V2Planner", "build", "size_problem", "cluster_bank",
           "multi_crop", "multi_crop_loader"]
