"""DeepCluster-v2's planner, multi-crop data and network (SwAV paper; DEEPCLUSTER.md section 5).

Each epoch:

1. **Clustering** (``V2Planner.plan``): the memory bank holds, for every image, the
   L2-normalised embeddings of its two large crops as the previous epoch's training computed
   them; before epoch 0 one pass fills it (``fill_bank``), so no epoch trains without
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

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from deepcluster import distributed, memory
from deepcluster.clustering import KMeansResult, kmeans
from deepcluster.data import ImageSource, Normalize, decode_problem, uniform_cluster_sample
from deepcluster.data.multicrop import UNREADABLE, CropGroup, MultiCrop, MultiCropDataset, collate_crops
from deepcluster.data.transforms import color_jitter
from deepcluster.features import Keep, autocast, loader_kwargs, local_features
from deepcluster.health import check_features
from deepcluster.memory_bank import BANK_CROPS, MemoryBank, fill_batches
from deepcluster.methods import STREAM_BANK_VIEWS, STREAM_CLUSTERING, STREAM_SAMPLER, Method, Plan, derived_seed
from deepcluster.methods.records import epoch_record, final_record
from deepcluster.models import Backbone, model_from_config
from deepcluster.models.projection import Embedder, MultiCropModel, PrototypeHead
from deepcluster.optim import LARS
from deepcluster.partition import Partition, TooFewDecoded
from deepcluster.progress import Progress, track
from deepcluster.run_files import SKIPPED_NAME

if TYPE_CHECKING:
    from deepcluster.config import Config

# v2's setting ``empty_clusters`` -> the k-means' empty-cluster rule
EMPTY_RULE = {"keep": "keep", "split": "nudge"}


def build(config: Config, device: torch.device) -> tuple[Backbone, PrototypeHead, torch.optim.Optimizer]:
    """A fresh backbone, its projection and prototypes (``PrototypeHead``) on ``device``, and
    the optimiser of the backbone and projection (the prototypes are never trained): SGD, or
    LARS with ``optimizer: lars``."""
    torch.manual_seed(config.seed)
    model = model_from_config(config)
    head = PrototypeHead.for_backbone(model, config.projection_hidden, config.projection_dim, config.prototypes)
    model.to(device)
    head.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
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


def head_seed(seed: int, epoch: int, head: int) -> int:
    """The spherical k-means seed of head ``head`` at epoch ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, STREAM_CLUSTERING, head]).generate_state(1)[0])


@torch.no_grad()
def fill_bank(network: MultiCropModel, source: ImageSource, config: Config, device: torch.device,
              before_batch: Callable[[], object] | None = None) -> MemoryBank:
    """The pass before epoch 0: the two large crops of every image, embedded by the network
    in training mode (without gradients), make the first memory bank, as the reference's
    ``init_memory`` does. In eval mode a fresh network's BatchNorm has no statistics yet and
    maps every image to nearly the same embedding (cosines above 0.9999 on the test images),
    which leaves the first clustering arbitrary. The two crops of a batch pass the network
    together, so even a last batch of one image gives BatchNorm two rows.

    Args:
        before_batch: called before each batch (``faults.instrument`` puts its ``features``
            point here).

    Raises:
        TrainingDiverged: an embedding is NaN or infinite.
    """
    network.train()
    first = multi_crop(config).groups[0]
    transform = dataclasses.replace(multi_crop(config), groups=(dataclasses.replace(first, count=BANK_CROPS),))
    n_images = len(source)
    indices = distributed.shard(np.arange(n_images))
    # Each image's crops seeded by its index, each step's batch the global one (``fill_batches``):
    # the processes together compute one process's bank.
    dataset = MultiCropDataset(source, indices, np.zeros((1, n_images), dtype=np.int64), transform, config.seed, 0,
                               stream=STREAM_BANK_VIEWS, positions=indices)
    loader = DataLoader(dataset, batch_sampler=fill_batches(indices, n_images, config.feature_batch_size),
                        collate_fn=functools.partial(collate_crops, transform.groups),
                        **loader_kwargs(config.workers, device))
    bank = MemoryBank.empty(n_images, config.projection_dim)  # this process's share (its block of the images)
    embedded = []
    normalize = Normalize(config.mean, config.std)
    for crops, targets, rows in track(loader, len(dataset), "memory bank", unit="img", size=lambda batch: len(batch[2])):
        if before_batch is not None:
            before_batch()
        with autocast(device, config.precision == "bf16"):
            embeddings, _ = network([normalize(crop, device, config.channels_last) for crop in crops])
        embeddings = embeddings.float().cpu().view(BANK_CROPS, len(rows), embeddings.shape[-1])
        check_features(embeddings.reshape(-1, embeddings.shape[-1]).numpy(), 0)
        decoded = (targets[:, 0] != UNREADABLE).numpy()
        rows = rows.numpy()
        bank.write(rows[decoded], embeddings[:, torch.from_numpy(decoded)])
        embedded.append(rows[decoded])
    bank.settle_filling(np.concatenate(embedded))  # the other processes' images handed over
    return bank


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


def cluster_and_gather(points: torch.Tensor, local: np.ndarray, rows: np.ndarray, n_images: int, n_clusters: int,
                       n_iter: int, seed: int, empty: str) -> tuple[np.ndarray, KMeansResult]:
    """Spherical k-means of the unit ``points`` this process holds (those of images
    ``local``; one process is a world of one: with several, sums and sizes are all-reduced),
    then every process's labels gathered: ``(n_images,)`` assignments, -1 outside ``rows``
    (the images with a point on some process), and the k-means' result.

    Args:
        empty: v2's setting ``empty_clusters``: ``keep`` (the reference) or ``split`` (the
            ``nudge`` rule of :mod:`deepcluster.clustering.empty`).
    """
    result = kmeans(points, n_clusters, n_iter, seed, backend="torch", init="randperm", device=points.device,
                    metric="cosine", empty=EMPTY_RULE[empty], shard=True)
    labels = distributed.gather_rows(result.assignments, local, n_images)
    assignments = np.full(n_images, -1, dtype=np.int64)
    assignments[rows] = labels[rows]
    return assignments, result


def cluster_bank(bank: MemoryBank, counts: Sequence[int], n_iter: int, seed: int, epoch: int, empty: str = "keep",
                 device: torch.device | str = "cpu") -> BankClustering:
    """Spherical k-means of the bank for every head: head h clusters the embeddings of crop
    h mod 2 into ``counts[h]`` clusters (seeded by ``seed``, ``epoch`` and h). With several
    processes each clusters the rows it holds (sums and sizes all-reduced) and every
    process gets all assignments."""
    start = time.perf_counter()
    rows = np.flatnonzero(bank.all_decoded())
    held = torch.from_numpy(np.flatnonzero(bank.decoded))
    local = bank.rows[bank.decoded]
    targets = np.full((len(counts), bank.n_images), -1, dtype=np.int64)
    centroids, objective, n_empty, n_split = [], [], [], []
    with Progress(len(counts), f"spherical k-means, {len(counts)} head(s)") as bar:
        for head, count in enumerate(counts):
            points = bank.embeddings[head % BANK_CROPS, held].to(device)
            targets[head], result = cluster_and_gather(points, local, rows, bank.n_images, count, n_iter,
                                                       head_seed(seed, epoch, head), empty)
            centroids.append(torch.from_numpy(result.centroids))
            objective.append(result.objective[-1])
            n_empty.append(result.n_empty)
            n_split.append(result.n_split)
            bar.update()
    return BankClustering(targets, centroids, objective, n_empty, n_split, time.perf_counter() - start)


def multi_crop_loader(source: ImageSource, plan: Plan, config: Config, epoch: int,
                      device: torch.device) -> DataLoader:
    """An epoch of ``([crop batch, ...], (B, n_heads) targets, image index)`` batches: a plain
    shuffle of the images with targets (``sampler: shuffle``, the reference) or draws uniform
    over head 0's clusters; the last incomplete batch is dropped, as the reference does (a
    batch of one cannot pass the projection's BatchNorm)."""
    targets = plan.targets
    usable = targets[0] >= 0
    rng = np.random.default_rng(derived_seed(config.seed, epoch, STREAM_SAMPLER))
    if config.sampler == "uniform":
        indices = uniform_cluster_sample(targets[0], int(usable.sum()), rng)
    else:
        indices = rng.permutation(np.flatnonzero(usable))
    indices, positions = distributed.equal_shard(indices)  # every process the same number of steps
    dataset = MultiCropDataset(source, indices, targets, multi_crop(config), config.seed, epoch,
                               positions=positions if distributed.is_distributed() else None)
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

    @property
    def clustering_device(self) -> torch.device:
        setting = self.config.clustering_device
        return self.device if setting == "auto" else torch.device(setting)

    def checkpoint_entries(self) -> dict[str, Any]:
        """The whole memory bank, on the main process (the one that writes the checkpoint;
        the prototypes are in the head's weights). Every process calls it."""
        full = None if self.bank is None else self.bank.full()
        if full is None:
            return {}
        return {"bank": full[0], "bank_decoded": torch.from_numpy(full[1])}

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
        config, source = self.config, self.source
        time_features = 0.0
        if self.bank is None:
            start = time.perf_counter()
            with memory.stage("features"):  # the bank's first filling
                self.bank = self.reduce(MultiCropModel(model, head.projection, head.prototypes), source, config,
                                        self.device)
            time_features = time.perf_counter() - start
            for index in np.flatnonzero(~self.bank.all_decoded()):
                skipped[source.name(int(index))] = decode_problem(source, int(index))
        needed = max(config.prototypes)
        n_decoded = int(self.bank.all_decoded().sum())
        if n_decoded < needed:
            raise TooFewDecoded(f"only {n_decoded} of {len(source)} images could be decoded, fewer "
                                f"than the {needed} prototypes of a head; the reasons are in "
                                f"{str(config.run_dir / SKIPPED_NAME)!r}")
        with memory.stage("kmeans"):
            clustering = self.cluster(self.bank, config.prototypes, config.kmeans_iters, config.seed, epoch,
                                      config.empty_clusters, self.clustering_device)
        for index, centroids in enumerate(clustering.centroids):
            head.prototypes.set(index, centroids)
        assignments = clustering.targets[0]
        record = epoch_record(epoch, assignments, config.prototypes[0], previous,
                              (time_features, 0.0, clustering.seconds), sum(clustering.n_split), None,
                              {"spherical_objective": clustering.objective, "n_empty": clustering.n_empty})
        # With several processes no one holds every embedding: the scores of the assignments remain.
        points = None if distributed.is_distributed() else self.bank.embeddings[0].numpy()
        return Plan(assignments, record, clustering.targets, points=points, bank_rows=self.bank.sample)

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
        with memory.stage("features"):
            embeddings, indices, decoded, _ = local_features(Embedder(model, self.head.projection), source, config,
                                                          self.device)
        time_features = time.perf_counter() - start
        rows = np.flatnonzero(distributed.gather_in_order(decoded.astype(np.uint8), indices, len(source)))
        count = config.prototypes[0]
        if len(rows) < count:
            raise TooFewDecoded(f"only {len(rows)} of {len(source)} images could be decoded for the final clustering, "
                                f"fewer than the {count} prototypes of head 0")
        tick = time.perf_counter()
        with Progress(None, f"spherical k-means k={count}"), memory.stage("kmeans"):
            assignments, result = cluster_and_gather(
                torch.from_numpy(embeddings[decoded]).to(self.clustering_device), indices[decoded], rows,
                len(source), count, config.kmeans_iters, head_seed(config.seed, epochs, 0), config.empty_clusters)
        final = Partition(assignments, count, result.centroids, None, result.n_split, None, 0.0,
                          time.perf_counter() - tick)
        summary = final_record(epochs, final, last, time_features,
                               {"spherical_objective": result.objective[-1], "n_empty": result.n_empty})
        return final, summary, Plan(assignments, summary, points=None if distributed.is_distributed() else embeddings)


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
           "cluster_and_gather", "fill_bank", "head_seed", "multi_crop", "multi_crop_loader"]
