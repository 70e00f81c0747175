"""DeepCluster-v2's planner and training pass (SwAV paper; DEEPCLUSTER.md section 5).

Each epoch:

1. **Clustering** (``V2Planner.plan``): the memory bank holds, for every image, the
   L2-normalised embeddings of its two large crops as the previous epoch's training computed
   them; before epoch 0 one pass fills it (``fill_bank``), so no epoch trains without
   targets. Head h clusters the bank of crop h mod 2 by spherical k-means (``cluster_bank``);
   its prototypes are overwritten by the centroids and its assignments are the epoch's targets.
2. **Multi-crop data** (``multi_crop_loader``): a plain shuffle of the images (or uniform over
   head 0's clusters); each gives 2 large + V small crops, every crop carrying its targets.
3. **Training** (``V2Planner.train_one_epoch``): the backbone once per crop size, the
   projection, the prototypes' scores / temperature, cross-entropy averaged over heads; SGD
   or LARS at the step's rate of the warm-up + cosine schedule; the two large crops'
   embeddings go into the bank for the next epoch's clustering.

The memory bank and the prototypes travel in the checkpoint, so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from deepcluster import distributed
from deepcluster.checkpoint import CheckpointError
from deepcluster.clustering import cluster_sizes, nmi
from deepcluster.clustering.spherical import spherical_kmeans
from deepcluster.config import Config, ConfigError
from deepcluster.data import ImageSource, Normalize, decode_problem, uniform_cluster_sample
from deepcluster.data.multicrop import UNREADABLE, CropGroup, MultiCrop, MultiCropDataset
from deepcluster.data.transforms import color_jitter
from deepcluster.features import autocast, compute_features, loader_kwargs, local_features
from deepcluster.health import check_features, check_loss, cluster_warnings
from deepcluster.losses import per_head_losses
from deepcluster.methods import (STREAM_BANK_VIEWS, STREAM_CLUSTERING, STREAM_SAMPLER, STREAM_SCORES, Plan,
                                 derived_seed)
from deepcluster.methods.v1 import Partition, TooFewDecoded
from deepcluster.models import Backbone, model_from_config
from deepcluster.models.projection import Embedder, MultiCropModel, PrototypeHead
from deepcluster.monitor import KnnMonitor, label_scores, measures_body
from deepcluster.optim import LARS, epoch_learning_rates, set_lr
from deepcluster.progress import Progress, track
from deepcluster.runfolder import SKIPPED_NAME

BANK_CROPS = 2  # the memory bank keeps the embeddings of the first two (large) crops


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


@dataclass
class MemoryBank:
    """The embeddings the clustering reads, each process holding its share of the images
    (every ``world_size``-th image from its rank; all of them in one process).

    Attributes:
        embeddings: ``(2, n, dim)`` float32 (CPU): the L2-normalised embedding of the first
            and second crop of each image held, as last written.
        decoded: ``(n,)`` bool, the images held that decoded when the bank was filled (the
            others have no embedding and get no target).
        rows: ``(n,)`` the image indices held, ascending.
        n_images: images in the run.
    """

    embeddings: torch.Tensor
    decoded: np.ndarray
    rows: np.ndarray
    n_images: int
    outbox: list[tuple[np.ndarray, torch.Tensor]] = dataclasses.field(default_factory=list)

    @classmethod
    def empty(cls, n_images: int, dim: int) -> MemoryBank:
        rows = distributed.shard(np.arange(n_images))
        return cls(torch.zeros(BANK_CROPS, len(rows), dim), np.zeros(len(rows), dtype=bool), rows, n_images)

    @classmethod
    def from_full(cls, embeddings: torch.Tensor, decoded: np.ndarray) -> MemoryBank:
        """This process's share of a whole ``(2, N, dim)`` bank (a checkpoint's)."""
        rows = distributed.shard(np.arange(embeddings.shape[1]))
        index = torch.from_numpy(rows)
        return cls(embeddings[:, index].clone(), decoded[rows].copy(), rows, embeddings.shape[1])

    @staticmethod
    def positions(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which of the images ``rows`` this process holds (``(len(rows),)`` bool) and where
        in its share they are."""
        rows = np.asarray(rows, dtype=np.int64)
        held = rows % distributed.world_size() == distributed.rank()
        return held, rows[held] // distributed.world_size()

    def _store(self, rows: np.ndarray, embeddings: torch.Tensor) -> np.ndarray:
        """Put the embeddings of the images held in place; returns the mask of the others."""
        held, where = self.positions(rows)
        self.embeddings[:, torch.from_numpy(where)] = embeddings if held.all() else embeddings[:, torch.from_numpy(held)]
        return ~held

    def write(self, rows: np.ndarray, embeddings: torch.Tensor) -> None:
        """Store ``(2, len(rows), dim)`` embeddings of the images ``rows``: those of images
        this process holds in place, the others for ``synchronise`` to hand over."""
        rows, embeddings = np.asarray(rows, dtype=np.int64), embeddings.float().cpu()
        others = self._store(rows, embeddings)
        if others.any():
            self.outbox.append((rows[others], embeddings[:, torch.from_numpy(others)]))

    def synchronise(self) -> None:
        """With several processes, hand each process what the others wrote of its images:
        each process in turn broadcasts its outbox and the others keep their rows, so no
        process holds more than its share and one outbox. No-op alone."""
        outbox, self.outbox = self.outbox, []
        if not distributed.is_distributed():
            return
        rows = np.concatenate([r for r, _ in outbox]) if outbox else np.zeros(0, dtype=np.int64)
        dim = self.embeddings.shape[2]
        embeddings = torch.cat([e for _, e in outbox], dim=1) if outbox else torch.zeros(BANK_CROPS, 0, dim)
        for source, count in enumerate(distributed.all_gather_ints(len(rows))):
            if count == 0:
                continue
            mine = source == distributed.rank()
            sent_rows = distributed.broadcast(torch.from_numpy(rows) if mine else torch.zeros(count, dtype=torch.int64),
                                              source).numpy()
            sent = distributed.broadcast(embeddings.contiguous() if mine else torch.zeros(BANK_CROPS, count, dim),
                                         source)
            if not mine:
                self._store(sent_rows, sent)

    def all_decoded(self) -> np.ndarray:
        """``(N,)`` bool, the images of every process's share that decoded."""
        return distributed.gather_in_order(self.decoded.astype(np.uint8), self.rows, self.n_images).astype(bool)

    def full(self) -> tuple[torch.Tensor, np.ndarray] | None:
        """The whole ``(2, N, dim)`` bank and ``(N,)`` decoded flags on the main process (for
        its checkpoint), None on the others."""
        if not distributed.is_distributed():
            return self.embeddings, self.decoded
        gathered = distributed.gather_to_main(self.embeddings.transpose(0, 1).numpy(), self.rows)
        flags = distributed.gather_to_main(self.decoded, self.rows)
        if gathered is None or flags is None:
            return None
        return torch.from_numpy(np.ascontiguousarray(gathered[0].transpose(1, 0, 2))), flags[0]


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
    dataset = MultiCropDataset(source, indices, np.zeros((1, n_images), dtype=np.int64), transform, config.seed, 0,
                               stream=STREAM_BANK_VIEWS)
    loader = DataLoader(dataset, batch_size=config.feature_batch_size, shuffle=False,
                        **loader_kwargs(config.workers, device))
    bank = MemoryBank.empty(n_images, config.projection_dim)  # this process's share: the images it embeds here
    normalize = Normalize(config.mean, config.std)
    for crops, targets, rows in track(loader, len(dataset), "memory bank", unit="img", size=lambda batch: len(batch[2])):
        if before_batch is not None:
            before_batch()
        with autocast(device, config.precision == "bf16"):
            embeddings, _ = network([normalize(crop, device, config.channels_last) for crop in crops])
        embeddings = embeddings.float().cpu().view(BANK_CROPS, len(rows), -1)
        check_features(embeddings.reshape(-1, embeddings.shape[-1]).numpy(), 0)
        decoded = (targets[:, 0] != UNREADABLE).numpy()
        rows = rows.numpy()
        bank.write(rows[decoded], embeddings[:, torch.from_numpy(decoded)])
        bank.decoded[bank.positions(rows[decoded])[1]] = True
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


def cluster_bank(bank: MemoryBank, counts: Sequence[int], n_iter: int, seed: int, epoch: int, empty: str = "keep",
                 device: torch.device | str = "cpu") -> BankClustering:
    """Spherical k-means of the bank for every head: head h clusters the embeddings of crop
    h mod 2 into ``counts[h]`` clusters (seeded by ``seed``, ``epoch`` and h). With several
    processes each clusters the rows it holds (sums and sizes all-reduced) and every
    process gets all assignments."""
    start = time.perf_counter()
    n_images = bank.n_images
    rows = np.flatnonzero(bank.all_decoded())
    held = torch.from_numpy(np.flatnonzero(bank.decoded))
    local = bank.rows[bank.decoded]
    targets = np.full((len(counts), n_images), -1, dtype=np.int64)
    centroids, objective, n_empty, n_split = [], [], [], []
    with Progress(len(counts), f"spherical k-means, {len(counts)} head(s)") as bar:
        for head, count in enumerate(counts):
            points = bank.embeddings[head % BANK_CROPS, held].to(device)
            result = spherical_kmeans(points, count, n_iter, seed=head_seed(seed, epoch, head), empty=empty)
            labels = distributed.gather_rows(result.assignments.cpu().numpy(), local, n_images)
            targets[head, rows] = labels[rows]
            centroids.append(result.centroids.cpu())
            objective.append(result.objective[-1])
            n_empty.append(result.n_empty)
            n_split.append(result.n_split)
            bar.update()
    return BankClustering(targets, centroids, objective, n_empty, n_split, time.perf_counter() - start)


def multi_crop_loader(source: ImageSource, targets: np.ndarray, config: Config, epoch: int,
                      device: torch.device) -> DataLoader:
    """An epoch of ``([crop batch, ...], (B, n_heads) targets, image index)`` batches: a plain
    shuffle of the images with targets (``sampler: shuffle``, the reference) or draws uniform
    over head 0's clusters; the last incomplete batch is dropped, as the reference does (a
    batch of one cannot pass the projection's BatchNorm)."""
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


def check_sizes(config: Config, n_images: int) -> None:
    """Refuse, with one line, settings the data cannot satisfy.

    Raises:
        ConfigError: a head with more prototypes than images, a batch larger than the data,
            or a batch that does not split evenly over the processes.
    """
    largest = max(config.prototypes)
    if largest > n_images:
        raise ConfigError(f"setting 'prototypes' asks for {largest} prototypes in a head but the data has only "
                          f"{n_images} images; choose at most {n_images} per head")
    if config.batch_size > n_images:
        raise ConfigError(f"setting 'batch_size' is {config.batch_size} but the data has only {n_images} images; v2 "
                          f"drops an epoch's last incomplete batch (as the reference), so choose at most {n_images}")
    if config.batch_size % distributed.world_size():
        raise ConfigError(f"setting 'batch_size' ({config.batch_size}) is the global batch and must split evenly over "
                          f"the {distributed.world_size()} processes")


class V2Planner:
    """Plans and trains the epochs of a v2 run, and holds its memory bank.

    Args:
        config: the run's settings.
        device: where the network runs.
        source: the training images.
        monitor: the online kNN, or None.
        head: the run's ``PrototypeHead`` (its projection makes the final clustering's embeddings).

    Attributes:
        reduce, cluster: the bank's first filling and the per-epoch clustering
            (``faults.instrument`` wraps them).
        bank: the memory bank (None until filled or restored).
        training_numbers: the last training pass's numbers for the log (loss per head, lr).
    """

    def __init__(self, config: Config, device: torch.device, source: ImageSource, monitor: KnnMonitor | None,
                 head: PrototypeHead) -> None:
        self.config, self.device, self.source, self.monitor, self.head = config, device, source, monitor, head
        self.reduce: Callable[..., MemoryBank] = fill_bank
        self.cluster: Callable[..., BankClustering] = cluster_bank
        self.bank: MemoryBank | None = None
        self.training_numbers: dict[str, Any] = {}

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
        bank, decoded = saved.get("bank"), saved.get("bank_decoded")
        shape = (BANK_CROPS, len(self.source), self.config.projection_dim)
        if not (isinstance(bank, torch.Tensor) and tuple(bank.shape) == shape and bank.dtype == torch.float32
                and isinstance(decoded, torch.Tensor) and decoded.dtype == torch.bool
                and tuple(decoded.shape) == shape[1:2]):
            raise CheckpointError(f"the checkpoint holds no memory bank of shape {shape} (entries 'bank' and "
                                  "'bank_decoded'); it is not a resumable v2 checkpoint of this run")
        self.bank = MemoryBank.from_full(bank, decoded.numpy())  # this process's share

    def plan(self, model: Backbone, head: PrototypeHead, epoch: int, previous: np.ndarray | None,
             skipped: dict[str, str]) -> Plan:
        """Epoch ``epoch``'s (0-based) plan: the bank (filled first at the start of a run)
        clustered per head, the prototypes set to the centroids, and the numbers of both.

        Raises:
            TooFewDecoded: fewer images decoded than a head has prototypes.
        """
        config, source = self.config, self.source
        record: dict[str, Any] = {"epoch": epoch + 1}
        time_features = 0.0
        if self.bank is None:
            start = time.perf_counter()
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
        clustering = self.cluster(self.bank, config.prototypes, config.kmeans_iters, config.seed, epoch,
                                  config.empty_clusters, self.clustering_device)
        for index, centroids in enumerate(clustering.centroids):
            head.prototypes.set(index, centroids)
        assignments = clustering.targets[0]
        sizes = cluster_sizes(assignments, config.prototypes[0])
        record.update(time_features=time_features, time_pca=0.0, time_kmeans=clustering.seconds,
                      n_split=sum(clustering.n_split), time_clustering=clustering.seconds,
                      clustering_objective=None,  # v1's is a squared distance; v2's a cosine, below
                      spherical_objective=clustering.objective, n_empty=clustering.n_empty,
                      n_nonempty=sizes.n_nonempty, largest_cluster_share=sizes.largest_share,
                      nmi_prev=nmi(previous, assignments) if previous is not None else None,
                      warnings=cluster_warnings(assignments))
        tick = time.perf_counter()
        # With several processes no one holds every embedding: the scores of the assignments remain.
        points = None if distributed.is_distributed() else self.bank.embeddings[0].numpy()
        record.update(label_scores(assignments, source.labels, points,
                                   derived_seed(config.seed, epoch, STREAM_SCORES), config.kmeans_backend))
        monitor = self.monitor
        if monitor is not None and (epoch % config.val_every == 0 or epoch == config.epochs - 1):
            record.update(self.knn_scores(model))
        record["time_monitor"] = time.perf_counter() - tick
        return Plan(assignments, record, clustering.targets)

    def knn_scores(self, model: Backbone) -> dict[str, float]:
        """Online kNN of the validation images on the backbone's pooled features (what
        ``deepcluster eval`` reads), against a feature pass of the training images (each
        process holds its share of them)."""
        monitor, config = self.monitor, self.config
        body = measures_body(model, config, monitor)
        val_features, val_decoded, val_body = compute_features(model, monitor.val, config, self.device, body=body)
        if monitor.memory is None:
            return monitor.score_with_body((val_features, val_body), val_decoded, None, None, self.device)
        features, rows, decoded, pooled = local_features(model, self.source, config, self.device,
                                                         np.flatnonzero(monitor.memory), body=body)
        return monitor.score_with_body((val_features, val_body), val_decoded,
                                       (features[decoded], None if pooled is None else pooled[decoded]),
                                       monitor.train_labels[rows[decoded]], self.device)

    def train_one_epoch(self, model: Backbone, head: PrototypeHead, optimizer: torch.optim.Optimizer,
                        loader: DataLoader, config: Config, epoch: int, device: torch.device,
                        unreadable: set[int] | None = None,
                        loss_fn: Callable[..., torch.Tensor] | None = None) -> tuple[float, int]:
        """One multi-crop pass; returns (mean loss, images trained on) and leaves the loss of
        each head and the last rate in ``training_numbers``.

        ``loss_fn(scores per head, (n_heads, B) targets, temperature)`` gives each head's
        loss (``losses.per_head_losses``); the step minimises their mean. An image that
        cannot be read any more is left out of the loss and of the bank, and added to
        ``unreadable``.

        Raises:
            TrainingDiverged: a batch's loss is NaN or infinite (before its step).
        """
        loss_fn = loss_fn or per_head_losses
        network: nn.Module = MultiCropModel(model, head.projection, head.prototypes)
        if distributed.is_distributed():
            network = nn.parallel.DistributedDataParallel(network)
        network.train()
        normalize = Normalize(config.mean, config.std)
        rates = epoch_learning_rates(config, len(loader), epoch)
        head_totals = np.zeros(len(config.prototypes))
        total_loss, seen, rate = 0.0, 0, float("nan")
        bar = Progress(len(loader) * loader.batch_size, f"epoch {epoch + 1} training", unit="img")
        for step, (crops, targets, image_indices) in enumerate(loader):
            failed = targets[:, 0] == UNREADABLE
            n_readable = len(image_indices) - int(failed.sum())
            if n_readable < len(image_indices) and unreadable is not None:
                unreadable.update(int(index) for index in image_indices[failed])
            rate = float(rates[step])
            set_lr(optimizer, rate)
            with autocast(device, config.precision == "bf16"):
                embeddings, scores = network([normalize(crop, device, config.channels_last) for crop in crops])
            head_losses = loss_fn([s.float() for s in scores], targets.T.to(device), config.temperature)
            loss = head_losses.mean()
            loss_value = loss.item()
            check_loss(loss_value, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # The bank for the next epoch: the two large crops' embeddings, as computed here.
            batch = len(image_indices)
            large = embeddings.detach()[:BANK_CROPS * batch].view(BANK_CROPS, batch, -1)
            kept = ~failed
            self.bank.write(image_indices[kept].numpy(), large[:, kept.to(large.device)])
            head_totals += head_losses.detach().double().cpu().numpy() * n_readable
            total_loss += loss_value * n_readable
            seen += n_readable
            bar.update(batch, note=f"loss {total_loss / max(seen, 1):.4f}")
        bar.close()
        self.bank.synchronise()
        if distributed.is_distributed():  # the epoch's numbers over every process's share
            totals = distributed.all_reduce_sum(torch.from_numpy(np.concatenate([[total_loss, seen], head_totals])))
            total_loss, seen, head_totals = float(totals[0]), int(round(float(totals[1]))), totals[2:].numpy()
        self.training_numbers = {"train_loss_per_head": (head_totals / max(seen, 1)).tolist(), "lr": rate}
        return total_loss / max(seen, 1), seen

    def final_clustering(self, model: Backbone, epochs: int, last: np.ndarray | None) -> tuple[Partition, dict]:
        """The trained network's clustering after ``epochs`` epochs: THE feature pass (centre
        view, eval mode) through backbone and projection, then head 0's spherical k-means
        (seeded as an epoch ``epochs`` would be), and its numbers for ``final.json``.

        Args:
            last: the last epoch's head-0 assignments (for ``nmi_last_epoch``), or None.
        """
        config, source = self.config, self.source
        start = time.perf_counter()
        # Each process embeds and clusters its share of the images; only assignments travel.
        embeddings, indices, decoded, _ = local_features(Embedder(model, self.head.projection), source, config,
                                                      self.device)
        time_features = time.perf_counter() - start
        rows = np.flatnonzero(distributed.gather_in_order(decoded.astype(np.uint8), indices, len(source)))
        local = indices[decoded]
        count = config.prototypes[0]
        if len(rows) < count:
            raise TooFewDecoded(f"only {len(rows)} of {len(source)} images could be decoded for the final clustering, "
                                f"fewer than the {count} prototypes of head 0")
        tick = time.perf_counter()
        with Progress(None, f"spherical k-means k={count}"):
            result = spherical_kmeans(torch.from_numpy(embeddings[decoded]).to(self.clustering_device), count,
                                      config.kmeans_iters, seed=head_seed(config.seed, epochs, 0),
                                      empty=config.empty_clusters)
        labels = distributed.gather_rows(result.assignments.cpu().numpy(), local, len(source))
        assignments = np.full(len(source), -1, dtype=np.int64)
        assignments[rows] = labels[rows]
        time_kmeans = time.perf_counter() - tick
        final = Partition(assignments, count, result.centroids.cpu().numpy(), None, result.n_split, None, 0.0,
                          time_kmeans)
        sizes = cluster_sizes(assignments, count)
        summary = {"epoch": epochs, "clustering_objective": None, "spherical_objective": result.objective[-1],
                   "n_clusters": count, "n_empty": result.n_empty, "n_nonempty": sizes.n_nonempty,
                   "largest_cluster_share": sizes.largest_share,
                   "nmi_last_epoch": None if last is None else nmi(last, assignments),
                   **label_scores(assignments, source.labels, None if distributed.is_distributed() else embeddings,
                                  derived_seed(config.seed, epochs, STREAM_SCORES), config.kmeans_backend),
                   **({} if self.monitor is None else self.knn_scores(model)),
                   "time_features": time_features, "time_clustering": time_kmeans}
        return final, summary


__all__ = ["BANK_CROPS", "BankClustering", "MemoryBank", "V2Planner", "build", "check_sizes", "cluster_bank",
           "fill_bank", "head_seed", "multi_crop", "multi_crop_loader"]
