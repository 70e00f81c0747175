"""The DeepCluster loop: features -> clustering -> pseudo-labelled data -> training.

Each epoch:

1. **Features.** The body, in eval mode, maps the centre view of every image to the
   output of its last fully connected layer before the ReLU.
2. **Clustering.** PCA-whitening to ``pca_dim``, L2 normalisation, k-means with a fresh
   seed; the assignments are the pseudo-labels (centroids kept only for prediction).
3. **Pseudo-labelled data.** An epoch's worth of images drawn uniformly over non-empty
   clusters, with random-resized-crop and flip.
4. **Training.** A new top layer with its own momentum-free SGD (cluster ids change every
   epoch, so last epoch's head means nothing); the body's SGD keeps its momentum.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from deepcluster import distributed
from deepcluster import runfolder
from deepcluster.checkpoint import CheckpointError, check_resumable, load_checkpoint, load_head, load_weights
from deepcluster.clustering import (cluster_sizes, kmeans,
                                    l2_normalize, nmi)
from deepcluster.clustering.pca import PCA, StreamingPCA, fit_pca
from deepcluster.clustering.pic import pic
from deepcluster.clustering.search import faiss_has_gpu
from deepcluster.config import Config, ConfigError, check_unchanged, from_dict
from deepcluster.data.pseudo import UNREADABLE
from deepcluster.data import (ArraySource, ColorJitter, DataError, FolderSource, ImageSource, Normalize,
                              PseudoLabelDataset, RandomResizedCropFlip, decode_problem, load_digits_source,
                              uniform_cluster_sample, walk_relative)
from deepcluster.faults import check_environment as check_fault_environment
from deepcluster.faults import fault_point
from deepcluster.features import PassSettings, autocast, compute_features, feature_pass, loader_kwargs
from deepcluster.health import TrainingDiverged, check_features, check_loss, cluster_warnings
from deepcluster.models import Backbone, model_from_config
from deepcluster.models.heads import ClassifierHead, WithHead
from deepcluster.monitor import KnnMonitor, label_scores, raw_pixel_nmi
from deepcluster.messages import plural
from deepcluster.progress import Progress
from deepcluster.runfolder import CHECKPOINT_NAME
from deepcluster.scalars import ScalarLog

def open_source(config: Config, run_dir: Path | None = None) -> ImageSource:
    """The images of the run: the built-in digits when ``config.data`` is None; with
    ``run_dir``, the list the run stored when it started (``RUN/images.json``), when it has
    one, else a fresh scan of the folder."""
    if config.data is None:
        return load_digits_source()
    return FolderSource(config.data, None if run_dir is None else runfolder.read_images(run_dir))


def folder_changes(source: ImageSource, skipped: dict[str, str]) -> str | None:
    """What changed in a run's data folder since the run stored its image list (a cheap
    listing, no header read), as a warning; ``None`` when nothing did."""
    if not isinstance(source, FolderSource):
        return None
    stored = set(source.relative_files())
    present = set(walk_relative(source.root))
    added = [name for name in present - stored if str(Path(source.root) / name) not in skipped]
    missing = stored - present
    if not added and not missing:
        return None
    return (f"deepcluster: warning: the data folder {source.root!r} changed since the run started: "
            f"{len(added)} new image file(s) not used (a run keeps the images it started with, listed in "
            f"images.json), {len(missing)} missing (left out as unreadable)")


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first GPU when one is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"setting 'device' is {name!r} but no CUDA GPU is available; use device: cpu or auto")
    return device


def derived_seed(seed: int, epoch: int, stream: int) -> int:
    """A 32-bit seed that is a pure function of (run seed, epoch, stream)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


@dataclass
class Clustering:
    """One epoch's clustering: pseudo-labels for every image (-1 where unusable).

    Attributes:
        assignments: ``(N,)`` int64 pseudo-label of every image.
        n_clusters: number of pseudo-labels (k for k-means; found by PIC).
        centroids: ``(n_clusters, pca_dim)`` cluster centres in the PCA space (for PIC,
            cluster means), to place new images.
        objective: mean squared distance to the centroid (k-means only).
        n_split: empty clusters re-seeded during k-means.
        pca: the projection fitted this epoch.
        time_pca: seconds spent fitting the PCA and projecting.
        time_kmeans: seconds spent in k-means (or PIC).
    """

    assignments: np.ndarray
    n_clusters: int
    centroids: np.ndarray
    objective: float | None
    n_split: int
    pca: PCA
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


def cluster_points(points: np.ndarray, ok: np.ndarray, pca: PCA, config: Config, seed: int,
                   device: str = "cpu", previous: np.ndarray | None = None) -> Clustering:
    """k-means (or PIC) of the reduced ``(N, pca_dim)`` unit rows whose ``ok`` is true.

    ``previous`` (last epoch's assignments) seeds k-means when ``kmeans_init`` is
    ``previous``; without it (the first epoch) that init falls back to random points."""
    fault_point("clustering")
    start = time.perf_counter()
    usable = points[ok] if not ok.all() else points
    init = config.kmeans_init
    if init == "previous":
        init = "random" if previous is None else previous_centroids(usable, previous[ok], config.n_clusters, seed)
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
    assignments[ok] = labels
    return Clustering(assignments, n_clusters, centroids, objective, n_split, pca, 0.0, time_kmeans)


def cluster_features(features: np.ndarray, ok: np.ndarray, config: Config, seed: int,
                     device: str = "cpu") -> Clustering:
    """PCA-whiten, L2-normalise and cluster the usable rows of in-memory ``(N, D)`` features."""
    start = time.perf_counter()
    pca = fit_pca(features[ok], config.pca_dim, config.whiten_power)
    points = np.zeros((len(features), pca.n_components), dtype=np.float32)
    points[ok] = l2_normalize(pca.transform(features[ok]))
    time_pca = time.perf_counter() - start
    clustering = cluster_points(points, ok, pca, config, seed, device)
    clustering.time_pca = time_pca
    return clustering


def pca_dim_for(pca_dim: int, n_images: int) -> int:
    """The PCA width used for ``n_images`` images: ``pca_dim``, or half the images when
    there are too few. Whitened to ``N - 1`` or more dimensions, ``N`` points are all equally
    far apart (a regular simplex), so k-means can only split them at random."""
    return pca_dim if n_images > pca_dim + 1 else max(1, (n_images - 1) // 2)


@dataclass
class ReducedFeatures:
    """One feature pass, reduced for clustering.

    Attributes:
        points: ``(N, pca_dim)`` float32 unit rows (zero for unusable images; no columns
            when fewer than two images decoded).
        decoded: ``(N,)`` bool, the images that decoded.
        pca: the fitted PCA (``None`` when fewer than two images decoded).
        time_network: seconds in the network.
        time_pca: seconds in the PCA (fit and projections).
        kept: ``(keep.sum(), feature_dim)`` raw features of the ``keep`` images, in image
            order (None without ``keep``).
        keep: the ``(N,)`` bool mask the pass was given.
    """

    points: np.ndarray
    decoded: np.ndarray
    pca: PCA | None
    time_network: float
    time_pca: float
    kept: np.ndarray | None = None
    keep: np.ndarray | None = None

    def raw(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw features and decoded flags of the ``(N,)`` bool ``rows`` (a subset of ``keep``)."""
        return self.kept[rows[self.keep]], self.decoded[rows]


@torch.no_grad()
def reduce_features(model: Backbone, source: ImageSource, config: Config, device: torch.device,
                    seed: int, epoch: int = 0, keep: np.ndarray | None = None) -> ReducedFeatures:
    """The feature pass streamed into PCA-whitening and L2 normalisation.

    Only ``(N, pca_dim)`` is kept for k-means. With ``pca_sample_size`` unset the PCA is
    fitted on every image's features, as the reference does (holding ``N x D`` until the
    fit); with it set, the images are visited in a seeded random order, the PCA is fitted on
    the first ``pca_sample_size`` of them and every later batch is projected on arrival,
    so memory stays bounded (ImageNet: 1.6 GB of sample instead of 21 GB).

    Args:
        keep: ``(N,)`` bool, images whose raw features are also returned (``kept``), e.g.
            the online kNN's memory; None keeps none.

    Raises:
        TrainingDiverged: a feature is NaN or infinite (``epoch``, 0-based, is named).
    """
    model.eval()
    n_images = len(source)
    bounded = config.pca_sample_size is not None and config.pca_sample_size < n_images
    order = np.random.default_rng(seed).permutation(n_images) if bounded else np.arange(n_images)
    indices = distributed.shard(order)
    share = -(-config.pca_sample_size // distributed.world_size()) if bounded else len(indices)
    reducer = StreamingPCA(n_images, pca_dim_for(config.pca_dim, n_images), config.whiten_power,
                           sample_size=max(share, 2),
                           gather_sample=distributed.all_gather_rows if distributed.is_distributed() else None)
    local_ok = np.zeros(len(indices), dtype=bool)
    keep_local = None if keep is None else keep[indices]
    kept_local = None if keep is None else np.zeros((int(keep_local.sum()), model.clustered_dim), dtype=np.float32)
    kept_position = 0
    position, time_pca = 0, 0.0
    start = time.perf_counter()

    def forward(batch: torch.Tensor) -> torch.Tensor:
        fault_point("features")
        return model.forward_clustered(batch)

    def add(rows: np.ndarray, out: torch.Tensor, ok: np.ndarray) -> None:
        nonlocal position, kept_position, time_pca
        out = out.float().cpu().numpy()
        check_features(out, epoch)
        local_ok[position:position + len(rows)] = ok
        if keep_local is not None:
            wanted = keep_local[position:position + len(rows)]
            kept_local[kept_position:kept_position + int(wanted.sum())] = out[wanted]
            kept_position += int(wanted.sum())
        position += len(rows)
        tick = time.perf_counter()
        if ok.any():
            reducer.add(out[ok], rows[ok])
        time_pca += time.perf_counter() - tick

    feature_pass(forward, source, PassSettings.of_run(config, device), add, indices)
    mask = distributed.gather_rows(local_ok.astype(np.uint8), indices, n_images).astype(bool)
    # Back into image order: the rows of keep's true entries, ascending.
    kept = None if keep is None else distributed.gather_rows(kept_local, indices[keep_local], n_images)[keep]
    if mask.sum() < 2:  # no PCA to fit: the caller reports the images that did not decode
        return ReducedFeatures(np.zeros((n_images, 0), dtype=np.float32), mask, None,
                               time.perf_counter() - start, time_pca, kept, keep)
    tick = time.perf_counter()
    with Progress(None, "PCA-whitening"):
        reduced, pca = reducer.finish()
    if distributed.is_distributed():
        reduced = distributed.gather_rows(reduced[indices], indices, n_images)
    time_pca += time.perf_counter() - tick
    return ReducedFeatures(reduced, mask, pca, time.perf_counter() - start - time_pca, time_pca, kept, keep)


def color_jitter(config: Config) -> ColorJitter | None:
    """The training views' colour jitter, or None when off (the reference)."""
    if config.color_jitter == 0 and config.grayscale_prob == 0:
        return None
    return ColorJitter(config.color_jitter, config.color_jitter / 4, 0.8, config.grayscale_prob)


def train_one_epoch(model: Backbone, head: ClassifierHead, body_optimizer: torch.optim.Optimizer, source: ImageSource,
                    assignments: np.ndarray, config: Config, epoch: int,
                    device: torch.device, unreadable: set[int] | None = None) -> tuple[float, int]:
    """One pass of pseudo-label classification; returns (mean loss, images trained on).

    An image that cannot be read any more (it was readable in the feature pass) is left out
    of its batch's loss and its index added to ``unreadable``; a batch with no readable
    image still runs its step with a zero loss, so every process takes the same steps.

    Raises:
        TrainingDiverged: a batch's loss is NaN or infinite (checked before its step, so
            the weights never take a non-finite value).
    """
    usable = int((assignments >= 0).sum())
    rng = np.random.default_rng(derived_seed(config.seed, epoch, 1))
    if config.sampler == "uniform":
        indices = uniform_cluster_sample(assignments, usable, rng)
    else:
        indices = rng.permutation(np.flatnonzero(assignments >= 0))
    indices = distributed.shard(indices)
    transform = RandomResizedCropFlip(config.crop, (config.crop_scale_min, 1.0), flip=config.hflip,
                                      color=color_jitter(config))
    dataset = PseudoLabelDataset(source, indices, assignments, transform, config.seed, epoch)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, drop_last=False,
                        **loader_kwargs(config.workers, device))
    head_optimizer = torch.optim.SGD(head.parameters(), lr=config.head_lr or config.lr,
                                     weight_decay=config.weight_decay)
    normalize = Normalize(config.mean, config.std)
    criterion = nn.CrossEntropyLoss(ignore_index=UNREADABLE)
    network = WithHead(model, head)
    if distributed.is_distributed():
        network = nn.parallel.DistributedDataParallel(network)
    network.train()
    total_loss, seen = 0.0, 0
    bar = Progress(len(indices), f"epoch {epoch + 1} training", unit="img")
    for step, (images, targets, image_indices) in enumerate(loader):
        failed = targets == UNREADABLE
        n_readable = len(images) - int(failed.sum())
        if n_readable < len(images) and unreadable is not None:
            unreadable.update(int(index) for index in image_indices[failed])
        inputs = normalize(images, device, config.channels_last)
        targets = targets.to(device)
        with autocast(device, config.precision == "bf16"):
            logits = network(inputs)
        loss = criterion(logits.float(), targets) if n_readable else logits.float().sum() * 0.0
        if fault_point("training") == "nan":
            loss = loss * math.nan
        loss_value = loss.item()
        check_loss(loss_value, epoch, step)
        body_optimizer.zero_grad(set_to_none=True)
        head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        body_optimizer.step()
        head_optimizer.step()
        total_loss += loss_value * n_readable
        seen += n_readable
        bar.update(len(images), note=f"loss {total_loss / seen:.4f}")
    bar.close()
    return total_loss / max(seen, 1), seen


@dataclass
class RunState:
    """What a resumed run needs besides the weights."""

    epoch: int = 0  # epochs completed
    previous: np.ndarray | None = None  # last epoch's assignments
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    records: list[dict] = field(default_factory=list)  # log record of every completed epoch


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


def checkpoint_state(model: Backbone, head: ClassifierHead, optimizer: torch.optim.Optimizer, config: Config,
                     state: RunState, clustering: Clustering | None) -> dict:
    """Everything a resume or a later ``assign`` needs, as tensors and plain containers."""
    out = {
        "config": config.to_dict(),
        "arch": config.arch,
        "epoch": state.epoch,
        "model": dict(model.state_dict()),
        "head": dict(head.state_dict()),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "assignments": torch.from_numpy(state.previous) if state.previous is not None else None,
        "skipped": dict(state.skipped),
        "records": list(state.records),  # plain values (runfolder.json_record): log.jsonl is rebuilt from them
    }
    if clustering is not None:
        out["centroids"] = torch.from_numpy(clustering.centroids)
        out["pca_mean"] = torch.from_numpy(clustering.pca.mean)
        out["pca_projection"] = torch.from_numpy(clustering.pca.projection)
    return out


def restore(path: Path, model: Backbone, head: ClassifierHead, optimizer: torch.optim.Optimizer,
            config: Config) -> tuple[RunState, dict]:
    """Load a checkpoint into ``model``, ``head`` and ``optimizer``; returns the run state."""
    saved = load_checkpoint(path)
    check_resumable(saved, path)
    if saved.get("arch") != config.arch:
        raise CheckpointError(f"checkpoint {str(path)!r} is for architecture {saved.get('arch')!r}, "
                              f"but the run asks for {config.arch!r}")
    load_weights(model, saved["model"], path)
    load_head(head, saved["head"], path, next(model.parameters()).device)
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: {str(error).splitlines()[0]}") from None
    torch.set_rng_state(saved["torch_rng"])
    previous = saved.get("assignments")
    records = saved.get("records")
    state = RunState(int(saved["epoch"]), None if previous is None else previous.numpy().astype(np.int64),
                     dict(saved.get("skipped", {})),
                     records if isinstance(records, list) and all(isinstance(r, dict) for r in records) else [])
    return state, saved


def check_resume_config(saved: dict, config: Config) -> None:
    """A resumed run must use the settings it started with, except ``RESUMABLE`` ones."""
    try:
        old = from_dict(saved)
    except ConfigError as error:
        raise CheckpointError(f"the checkpoint's settings are invalid ({error})") from None
    check_unchanged(old, config)


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
    the epoch's feature pass kept (``reduced.kept``)."""
    val_features, val_decoded = compute_features(model, monitor.val, config, device)
    memory, memory_decoded = (None, None) if monitor.memory is None else reduced.raw(monitor.memory)
    return monitor.score(val_features, val_decoded, memory, memory_decoded, device)


def format_scores(record: dict) -> list[str]:
    """The label scores of a record, named so they cannot be misread (see ``monitor``)."""
    parts = []
    if "knn_top1" in record:
        parts.append(f"knn top-1 {record['knn_top1']:.1f}%")
    if "cluster_acc" in record:
        parts.append(f"acc(k=classes) {100 * record['cluster_acc']:.1f}%")
    if "nmi_labels" in record:
        parts.append(f"nmi {record['nmi_labels']:.3f} (chance {record['nmi_chance']:.3f}) "
                     f"ari {record['ari_labels']:.3f} purity {100 * record['purity']:.1f}%")
    return parts


def format_line(record: dict, epochs: int) -> str:
    """The one terminal line of an epoch: the scores are of the features the epoch clustered
    (the weights it started from: epoch 1 shows the random start)."""
    parts = [f"epoch {record['epoch']:>3}/{epochs}"]
    if record["clustering_objective"] is not None:
        parts.append(f"objective {record['clustering_objective']:.4f}")
    parts.append(f"loss {record['train_loss']:.4f}")
    parts.extend(format_scores(record))
    if record.get("nmi_prev") is not None:
        parts.append(f"nmi(t-1,t) {record['nmi_prev']:.3f}")
    parts.append(f"clusters {record['n_nonempty']} (largest {100 * record['largest_cluster_share']:.1f}%)")
    parts.append(f"time features {record['time_features']:.1f}s clustering {record['time_clustering']:.1f}s "
                 f"training {record['time_training']:.1f}s ({record['train_images_per_s']:.0f} img/s)")
    return "  ".join(parts)


def run(config: Config, resume: bool = False, log: Callable[[str], None] = print,
        stop: Callable[[dict], bool] | None = None) -> list[dict]:
    """Train DeepCluster as ``config`` says; returns the per-epoch records.

    Writes into ``config.out_dir``: ``config.yaml``, ``log.jsonl`` (one JSON object per
    epoch), ``assignments/epoch_NNNN.npy`` (epochs counted from 1, as on screen), ``skipped.tsv`` and ``checkpoint.pt``; after the
    last epoch, the final clustering (``add_final_clustering``); ``tensorboard/`` scalars.

    ``stop``, when given, is asked after each committed epoch with its record; True ends
    the run there (resumable, like a kill between epochs; no final clustering).

    A kill at any moment loses at most the epoch in progress: ``resume=True`` continues from
    the checkpoint and ends with the same assignments and weights as an uninterrupted run
    (see ``deepcluster.runfolder`` for how the folder is kept consistent).

    Raises:
        ConfigError, DataError, CheckpointError: bad settings, data or checkpoint, before
            any training starts.
        TrainingDiverged: the loss or the features became NaN or infinite; the checkpoint
            of the last good epoch is left as it was.
        RunFolderError: a file of the run folder cannot be written (full disk, read-only);
            the previous checkpoint is left as it was.
    """
    check_fault_environment()
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if not distributed.is_main_process():  # the main process holds the folder for all of them
        return _run(config, resume, log, device, stop)
    with runfolder.lock(config.run_dir):
        return _run(config, resume, log, device, stop)


def _run(config: Config, resume: bool, log: Callable[[str], None], device: torch.device,
         stop: Callable[[dict], bool] | None = None) -> list[dict]:
    """The body of :func:`run`, with the run folder locked."""
    run_dir = config.run_dir
    checkpoint_path = run_dir / CHECKPOINT_NAME
    if resume and not checkpoint_path.is_file():
        if not runfolder.started_run(run_dir):
            raise CheckpointError(f"nothing to resume: {str(checkpoint_path)!r} does not exist")
        # Killed during its first epoch: there is nothing to lose, start over.
        log(f"deepcluster: {str(run_dir)!r} has no checkpoint yet (the run stopped during its first epoch); "
            "starting from the beginning")
        resume = False
    if not resume and checkpoint_path.is_file():
        raise ConfigError(f"run folder {str(run_dir)!r} already holds a checkpoint; pass --resume to continue it "
                          "or choose another --out")
    source = open_source(config, run_dir if resume else None)
    monitor = None if config.val is None else KnnMonitor.open(config.val, source)
    if config.clustering == "kmeans" and config.n_clusters > len(source):
        raise ConfigError(f"setting 'n_clusters' is {config.n_clusters} but the data has only {len(source)} images; "
                          f"choose at most {len(source)}")
    model, head, optimizer = build(config, device)
    state = RunState()
    if resume:
        saved = load_checkpoint(checkpoint_path)
        check_resume_config(saved["config"], config)
        state, _ = restore(checkpoint_path, model, head, optimizer, config)
        if "records" not in saved:  # written before checkpoints stored the log records
            state.records = runfolder.records_from_log(run_dir, state.epoch)
        if state.previous is not None and len(state.previous) != len(source):
            raise ConfigError(f"the data folder {config.data!r} now holds {len(source)} usable images but the run "
                              f"was trained on {len(state.previous)}; restore the folder as it was, or start a new "
                              "run with another --out")
    for item in getattr(source, "skipped", []):
        state.skipped[item.path] = item.reason
    removed = []
    if distributed.is_main_process():  # one writer: other ranks could delete its temporary files
        removed = runfolder.prepare(run_dir, config, state.epoch, state.records, state.skipped)
        if isinstance(source, FolderSource):
            if not resume or not (run_dir / runfolder.IMAGES_NAME).is_file():  # or a run from before the list
                runfolder.write_images(run_dir, source.root, source.relative_files())
            else:
                change = folder_changes(source, state.skipped)
                if change:
                    log(change)
    labels = source.labels
    log(f"deepcluster: {plural(len(source), 'image')}"
        + (f" ({len(state.skipped)} unreadable file(s) skipped, listed in skipped.tsv)" if state.skipped else "")
        + f", {config.arch}{' + sobel' if config.sobel else ''}, k={config.n_clusters}, "
        f"{plural(config.epochs, 'epoch')}, device {device}, run folder {run_dir}"
        + (f", resuming after epoch {state.epoch}" if resume else "")
        + (f"; removed {len(removed)} temporary file(s) of an interrupted write" if removed else ""))
    if source.unlabelled:
        log(f"deepcluster: note: no class labels, so no NMI/ACC/ARI against them: {source.unlabelled}")
    if monitor is not None and monitor.note:
        log(f"deepcluster: {monitor.note}")
    elif monitor is None and labels is not None:
        log("deepcluster: the data folder has classes: add --val FOLDER (labelled images, e.g. a test split) "
            "to see the online kNN accuracy every epoch")
    if config.pca_dim > pca_dim_for(config.pca_dim, len(source)):
        log(f"deepcluster: warning: {plural(len(source), 'image')} are too few for pca_dim {config.pca_dim} "
            f"(whitened to N - 1 dimensions or more, the points are all equally far apart and k-means is "
            f"arbitrary); using {pca_dim_for(config.pca_dim, len(source))}")
    if resume and state.epoch >= config.epochs:
        log(f"deepcluster: the run has already trained {plural(state.epoch, 'epoch')}; nothing left to train "
            "(raise --epochs to train further)")

    records = []
    clustering: Clustering | None = None
    # Flushed every epoch, so a run that stops early keeps its scalars without a close().
    scalars = ScalarLog(run_dir, config.tensorboard and distributed.is_main_process())
    for epoch in range(state.epoch, config.epochs):
        record: dict = {"epoch": epoch + 1}  # counted from 1 wherever a person reads it
        recluster = state.previous is None or epoch % config.reassign_every == 0
        record.update(time_features=0.0, time_pca=0.0, time_kmeans=0.0, n_split=0)
        if recluster:
            measure_knn = monitor is not None and (epoch % config.val_every == 0 or epoch == config.epochs - 1)
            head_rows = (head_sample(len(source), config.n_clusters, derived_seed(config.seed, epoch, 4))
                         if config.head_init == "centroids" else None)
            reduced = reduce_features(model, source, config, device, derived_seed(config.seed, epoch, 2), epoch,
                                      keep=union(monitor.memory if measure_knn else None, head_rows))
            points, ok, pca = reduced.points, reduced.decoded, reduced.pca
            record["time_features"], time_pca = reduced.time_network, reduced.time_pca
            for index in np.flatnonzero(~ok):
                state.skipped[source.name(int(index))] = decode_problem(source, int(index))
            needed = config.n_clusters if config.clustering == "kmeans" else 2
            if ok.sum() < needed:
                if distributed.is_main_process():
                    runfolder.write_skipped(run_dir, state.skipped)
                raise DataError(f"only {int(ok.sum())} of {len(source)} images could be decoded, fewer than the "
                                f"{needed} clusters needed; the reasons are in "
                                f"{str(run_dir / runfolder.SKIPPED_NAME)!r}")
            clustering = cluster_points(points, ok, pca, config, derived_seed(config.seed, epoch, 0),
                                        clustering_device(config, device), state.previous)
            clustering.time_pca = time_pca
            assignments = clustering.assignments
            if config.head_reset or head.n_outputs != clustering.n_clusters:
                head.reset(clustering.n_clusters, device)
            if head_rows is not None:
                features, decoded = reduced.raw(head_rows)
                init_head_from_clusters(head.linear, features[decoded], assignments[head_rows][decoded],
                                        head_std=head.std)
            record.update(time_pca=clustering.time_pca, time_kmeans=clustering.time_kmeans,
                          n_split=clustering.n_split)
        else:
            assignments = state.previous
        record["time_clustering"] = record["time_pca"] + record["time_kmeans"]
        sizes = cluster_sizes(assignments, int(assignments.max()) + 1)
        record.update(
            clustering_objective=None if clustering is None else clustering.objective,
            n_nonempty=sizes.n_nonempty,
            largest_cluster_share=sizes.largest_share,
            # Stability: only meaningful when a new clustering replaced the previous one.
            nmi_prev=nmi(state.previous, assignments) if recluster and state.previous is not None else None,
            warnings=cluster_warnings(assignments),
        )
        tick = time.perf_counter()
        record.update(label_scores(assignments, labels, points if recluster else None,
                                   derived_seed(config.seed, epoch, 3), config.kmeans_backend))
        if recluster and measure_knn:
            record.update(knn_scores(model, monitor, reduced, config, device))
        record["time_monitor"] = time.perf_counter() - tick
        points = reduced = None

        start = time.perf_counter()
        unreadable: set[int] = set()
        loss, seen = train_one_epoch(model, head, optimizer, source, assignments, config, epoch, device, unreadable)
        for index in sorted(unreadable):
            name = source.name(index)
            if name not in state.skipped:
                log(f"deepcluster: warning: epoch {epoch + 1}: {name} could not be read in the training pass "
                    "(readable in the feature pass); left out of the loss and listed in skipped.tsv")
            state.skipped[name] = f"became unreadable during the run (training pass of epoch {epoch + 1})"
        record["time_training"] = time.perf_counter() - start
        record["train_loss"] = loss
        record["train_images_per_s"] = seen * distributed.world_size() / max(record["time_training"], 1e-9)
        record["n_images"] = int((assignments >= 0).sum())
        record["n_skipped"] = len(state.skipped)
        record = runfolder.json_record(record)

        state.epoch, state.previous = epoch + 1, assignments
        state.records.append(record)
        if distributed.is_main_process():
            runfolder.commit_epoch(run_dir, epoch, assignments, state.skipped,
                                   checkpoint_state(model, head, optimizer, config, state, clustering), record)
            scalars.write(record)
            log(format_line(record, config.epochs))
            for warning in record["warnings"]:
                log(f"deepcluster: warning: epoch {epoch + 1}: {warning}")
        records.append(record)
        if stop is not None and stop(record):
            break
    scalars.close()
    if config.final_clustering and state.epoch == config.epochs:
        summary = add_final_clustering(model, source, config, device, state, labels, redo=bool(records), log=log,
                                       monitor=monitor)
        if config.data is None and summary and "nmi_labels" in summary and distributed.is_main_process():
            log(digits_verdict(source, summary, config))
    return records


def digits_verdict(source: ArraySource, summary: dict, config: Config) -> str:
    """The demo's last line: the trained network's clustering beside k-means on the raw
    pixels at the same k (the baseline a feature learner has to beat)."""
    baseline = raw_pixel_nmi(source.images[..., 0], source.labels, summary["n_clusters"], backend=config.kmeans_backend)
    verdict = "above" if summary["nmi_labels"] > baseline else "NOT above"
    return (f"digits: NMI with the classes {summary['nmi_labels']:.3f} for the trained network's clustering vs "
            f"{baseline:.3f} for k-means on the raw 64 pixels (k = {summary['n_clusters']} both): {verdict} "
            f"the raw-pixel baseline")


def add_final_clustering(model: Backbone, source: ImageSource, config: Config, device: torch.device,
                         state: RunState, labels: np.ndarray | None, redo: bool = True,
                         log: Callable[[str], None] = print, monitor: KnnMonitor | None = None) -> dict | None:
    """Cluster the trained network's features once more and store it with the checkpoint.

    The clustering an epoch trains on comes from the weights at the *start* of that epoch,
    so the last epoch's centroids do not fit the weights saved at its end (on CIFAR-10 the
    saved centroids then keep only a fifth of the images in their cluster). The final
    clustering (same pipeline: features, a fresh PCA-whitening, k-means) fits the saved
    weights exactly: ``deepcluster assign`` uses it, and on the training images reproduces
    ``assignments/final.npy``. Stored as ``checkpoint["final"]`` (centroids, PCA, assignments)
    and ``RUN/final.json`` (its numbers); ``log.jsonl`` keeps one record per epoch only.

    Args:
        redo: when False, an existing final clustering of the same epoch is kept (a resume
            with nothing left to train only adds a missing one).

    Returns:
        The numbers written to ``final.json``, or None when kept.
    """
    checkpoint_path = config.run_dir / CHECKPOINT_NAME
    saved = load_checkpoint(checkpoint_path)
    if (not redo and saved.get("final") is not None and int(saved["final"]["epoch"]) == state.epoch
            and (config.run_dir / runfolder.ASSIGNMENTS_DIR / runfolder.FINAL_ASSIGNMENTS).is_file()):
        return None
    reduced = reduce_features(model, source, config, device, derived_seed(config.seed, state.epoch, 2), state.epoch,
                              keep=None if monitor is None else monitor.memory)
    final = cluster_points(reduced.points, reduced.decoded, reduced.pca, config,
                           derived_seed(config.seed, state.epoch, 0), clustering_device(config, device))
    final.time_pca = reduced.time_pca
    sizes = cluster_sizes(final.assignments, final.n_clusters)
    summary = {"epoch": state.epoch, "clustering_objective": final.objective, "n_clusters": final.n_clusters,
               "n_nonempty": sizes.n_nonempty, "largest_cluster_share": sizes.largest_share,
               "nmi_last_epoch": None if state.previous is None else nmi(state.previous, final.assignments),
               **label_scores(final.assignments, labels, reduced.points, derived_seed(config.seed, state.epoch, 3),
                              config.kmeans_backend),
               **({} if monitor is None else knn_scores(model, monitor, reduced, config, device)),
               "time_features": reduced.time_network, "time_clustering": final.time_pca + final.time_kmeans}
    time_features = reduced.time_network
    del reduced
    if distributed.is_main_process():
        saved.pop("format_version", None)
        saved["final"] = {"epoch": state.epoch, "centroids": torch.from_numpy(final.centroids),
                          "pca_mean": torch.from_numpy(final.pca.mean),
                          "pca_projection": torch.from_numpy(final.pca.projection),
                          "assignments": torch.from_numpy(final.assignments)}
        runfolder.save_final(config.run_dir, final.assignments, saved, json.dumps(summary) + "\n")
        parts = [f"final clustering of the trained network: {plural(sizes.n_nonempty, 'cluster')} "
                 f"(largest {100 * sizes.largest_share:.1f}%)"]
        if summary["nmi_last_epoch"] is not None:
            parts.append(f"nmi with epoch {state.epoch}'s {summary['nmi_last_epoch']:.3f}")
        parts.extend(format_scores(summary))
        parts.append(f"time {time_features + summary['time_clustering']:.1f}s")
        log("  ".join(parts))
    return summary


__all__ = ["Clustering", "add_final_clustering", "cluster_features", "cluster_points", "compute_features",
           "open_source", "reduce_features", "run", "train_one_epoch", "CheckpointError",
           "TrainingDiverged"]
