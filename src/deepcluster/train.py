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
from deepcluster.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deepcluster.clustering import (ari, cluster_sizes, clustering_accuracy, kmeans,
                                    l2_normalize, nmi)
from deepcluster.clustering.pca import PCA, fit_pca
from deepcluster.clustering.pic import pic
from deepcluster.config import Config, ConfigError, dump_yaml, from_dict
from deepcluster.data import (CenterView, DataError, FeatureDataset, FolderSource, ImageSource, Normalize,
                              PseudoLabelDataset, RandomResizedCropFlip, load_digits_source,
                              uniform_cluster_sample)
from deepcluster.models import Backbone, create_model
from deepcluster.progress import Progress, track
from deepcluster.scalars import ScalarLog

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
FINAL_NAME = "final.json"  # numbers of the final clustering (assignments/final.npy, checkpoint["final"])


def open_source(config: Config) -> ImageSource:
    """The images of the run: the built-in digits when ``config.data`` is None."""
    return load_digits_source() if config.data is None else FolderSource(config.data)


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


def autocast(config: Config, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


def loader_kwargs(config: Config, device: torch.device) -> dict:
    kwargs = {"num_workers": config.workers, "pin_memory": device.type == "cuda"}
    if config.workers > 0:
        kwargs["persistent_workers"] = False
        kwargs["prefetch_factor"] = 4
    return kwargs


@torch.no_grad()
def compute_features(model: Backbone, source: ImageSource, config: Config,
                     device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Clustered features of every image, in eval mode on the centre view.

    Returns:
        ``(N, feature_dim)`` float32 features (zero rows for unreadable images) and an
        ``(N,)`` bool mask of the images that decoded.
    """
    model.eval()
    normalize = Normalize(config.mean, config.std)
    indices = distributed.shard(np.arange(len(source)))
    dataset = torch.utils.data.Subset(FeatureDataset(source, CenterView(config.resize, config.crop)), indices)
    loader = DataLoader(dataset, batch_size=config.feature_batch_size, shuffle=False, **loader_kwargs(config, device))
    local = np.zeros((len(indices), model.feature_dim), dtype=np.float32)
    local_ok = np.zeros(len(indices), dtype=bool)
    position = 0
    for images, _, ok in track(loader, len(indices), "features", unit="img", size=lambda batch: len(batch[0])):
        with autocast(config, device):
            out = model.forward_features(normalize(images, device, config.channels_last))
        local[position:position + len(images)] = out.float().cpu().numpy()
        local_ok[position:position + len(images)] = ok.numpy()
        position += len(images)
    features = distributed.gather_rows(local, indices, len(source))
    ok = distributed.gather_rows(local_ok.astype(np.uint8), indices, len(source)).astype(bool)
    return features, ok


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
    """

    assignments: np.ndarray
    n_clusters: int
    centroids: np.ndarray
    objective: float | None
    n_split: int
    pca: PCA
    time_pca: float
    time_kmeans: float


def cluster_features(features: np.ndarray, ok: np.ndarray, config: Config, seed: int) -> Clustering:
    """PCA-whiten, L2-normalise and cluster (k-means or PIC) the usable rows of ``features``."""
    usable = features[ok]
    start = time.perf_counter()
    with Progress(None, "PCA-whitening"):
        pca = fit_pca(usable, config.pca_dim, config.whiten_power)
        points = l2_normalize(pca.transform(usable))
    time_pca = time.perf_counter() - start
    start = time.perf_counter()
    if config.clustering == "pic":
        with Progress(None, "PIC"):
            found = pic(points, knn_backend=config.kmeans_backend, seed=seed)
        labels, n_clusters, centroids, objective, n_split = (found.assignments, found.n_clusters, found.centroids,
                                                             None, 0)
    else:
        with Progress(config.kmeans_iters + 1, f"k-means k={config.n_clusters}") as bar:
            result = kmeans(points, config.n_clusters, config.kmeans_iters, seed=seed,
                            backend=config.kmeans_backend, init=config.kmeans_init,
                            on_iteration=lambda _: bar.update())
        labels, n_clusters, centroids, objective, n_split = (result.assignments, config.n_clusters, result.centroids,
                                                             result.objective[-1], result.n_split)
    time_kmeans = time.perf_counter() - start
    assignments = np.full(len(features), -1, dtype=np.int64)
    assignments[ok] = labels
    return Clustering(assignments, n_clusters, centroids, objective, n_split, pca, time_pca, time_kmeans)


def train_one_epoch(model: Backbone, body_optimizer: torch.optim.Optimizer, source: ImageSource,
                    assignments: np.ndarray, config: Config, epoch: int,
                    device: torch.device) -> tuple[float, int]:
    """One pass of pseudo-label classification; returns (mean loss, images seen)."""
    usable = int((assignments >= 0).sum())
    rng = np.random.default_rng(derived_seed(config.seed, epoch, 1))
    if config.sampler == "uniform":
        indices = uniform_cluster_sample(assignments, usable, rng)
    else:
        indices = rng.permutation(np.flatnonzero(assignments >= 0))
    indices = distributed.shard(indices)
    transform = RandomResizedCropFlip(config.crop, (config.crop_scale_min, 1.0), flip=config.hflip)
    dataset = PseudoLabelDataset(source, indices, assignments, transform, config.seed, epoch)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, drop_last=False,
                        **loader_kwargs(config, device))
    head_optimizer = torch.optim.SGD(model.top_layer.parameters(), lr=config.head_lr or config.lr,
                                     weight_decay=config.weight_decay)
    normalize = Normalize(config.mean, config.std)
    criterion = nn.CrossEntropyLoss()
    network = model
    if distributed.is_distributed():
        network = nn.parallel.DistributedDataParallel(model)
    model.train()
    total_loss, seen = 0.0, 0
    bar = Progress(len(indices), f"epoch {epoch + 1} training", unit="img")
    for images, targets in loader:
        inputs = normalize(images, device, config.channels_last)
        targets = targets.to(device)
        with autocast(config, device):
            logits = network(inputs)
        loss = criterion(logits.float(), targets)
        body_optimizer.zero_grad(set_to_none=True)
        head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        body_optimizer.step()
        head_optimizer.step()
        total_loss += loss.item() * len(images)
        seen += len(images)
        bar.update(len(images), note=f"loss {total_loss / seen:.4f}")
    bar.close()
    return total_loss / max(seen, 1), seen


@dataclass
class RunState:
    """What a resumed run needs besides the weights."""

    epoch: int = 0  # epochs completed
    previous: np.ndarray | None = None  # last epoch's assignments
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason


def build(config: Config, device: torch.device) -> tuple[Backbone, torch.optim.Optimizer]:
    """A fresh backbone on ``device`` and its body optimiser (SGD with momentum)."""
    torch.manual_seed(config.seed)
    model = create_model(config.arch, sobel=config.sobel, feature_dim=config.feature_dim)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.body_parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    return model, optimizer


def checkpoint_state(model: Backbone, optimizer: torch.optim.Optimizer, config: Config, state: RunState,
                     clustering: Clustering | None) -> dict:
    """Everything a resume or a later ``assign`` needs, as tensors and plain containers."""
    out = {
        "config": config.to_dict(),
        "arch": config.arch,
        "epoch": state.epoch,
        "model": {k: v for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "assignments": torch.from_numpy(state.previous) if state.previous is not None else None,
        "skipped": dict(state.skipped),
    }
    if clustering is not None:
        out["centroids"] = torch.from_numpy(clustering.centroids)
        out["pca_mean"] = torch.from_numpy(clustering.pca.mean)
        out["pca_projection"] = torch.from_numpy(clustering.pca.projection)
    return out


def restore(path: Path, model: Backbone, optimizer: torch.optim.Optimizer, config: Config) -> tuple[RunState, dict]:
    """Load a checkpoint into ``model`` and ``optimizer``; returns the run state."""
    saved = load_checkpoint(path)
    if saved.get("arch") != config.arch:
        raise CheckpointError(f"checkpoint {str(path)!r} is for architecture {saved.get('arch')!r}, "
                              f"but the run asks for {config.arch!r}")
    weights = saved["model"]
    if "top_layer.weight" in weights:
        model.reset_classifier(weights["top_layer.weight"].shape[0])
    try:
        model.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: {str(error).splitlines()[0]}") from None
    torch.set_rng_state(saved["torch_rng"])
    previous = saved.get("assignments")
    state = RunState(int(saved["epoch"]), None if previous is None else previous.numpy().copy(),
                     dict(saved.get("skipped", {})))
    return state, saved


RESUMABLE = {"epochs", "workers", "threads", "device", "feature_batch_size", "out_dir", "tensorboard",
             "final_clustering"}


def check_resume_config(saved: dict, config: Config) -> None:
    """A resumed run must use the settings it started with, except ``RESUMABLE`` ones."""
    old = from_dict(saved).to_dict()
    new = config.to_dict()
    changed = [k for k in new if k not in RESUMABLE and old.get(k) != new[k]]
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume with different settings ({details}); only {', '.join(sorted(RESUMABLE))} may change")


def label_scores(assignments: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    if labels is None:
        return {}
    usable = assignments >= 0
    truth, pred = labels[usable], assignments[usable]
    return {"nmi_labels": nmi(truth, pred), "acc_labels": clustering_accuracy(truth, pred), "ari_labels": ari(truth, pred)}


def format_line(record: dict, epochs: int) -> str:
    """The one terminal line of an epoch."""
    parts = [f"epoch {record['epoch'] + 1:>3}/{epochs}"]
    if record["clustering_objective"] is not None:
        parts.append(f"clus {record['clustering_objective']:.4f}")
    parts.append(f"loss {record['train_loss']:.4f}")
    if record.get("nmi_prev") is not None:
        parts.append(f"nmi(t-1,t) {record['nmi_prev']:.3f}")
    if "nmi_labels" in record:
        parts.append(f"nmi {record['nmi_labels']:.3f} acc {record['acc_labels']:.3f} ari {record['ari_labels']:.3f}")
    parts.append(f"clusters {record['n_nonempty']} (largest {100 * record['largest_cluster_share']:.1f}%)")
    parts.append(f"time feat {record['time_features']:.1f}s clus {record['time_clustering']:.1f}s "
                 f"train {record['time_training']:.1f}s ({record['train_images_per_s']:.0f} img/s)")
    return "  ".join(parts)


def write_skipped(run_dir: Path, skipped: dict[str, str]) -> None:
    """The list of files left out, one ``path<TAB>reason`` per line."""
    lines = "".join(f"{path}\t{reason}\n" for path, reason in sorted(skipped.items()))
    (run_dir / "skipped.tsv").write_text(lines)


def run(config: Config, resume: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Train DeepCluster as ``config`` says; returns the per-epoch records.

    Writes into ``config.out_dir``: ``config.yaml``, ``log.jsonl`` (one JSON object per
    epoch), ``assignments/epoch_NNNN.npy``, ``skipped.tsv`` and ``checkpoint.pt``; after the
    last epoch, the final clustering (``add_final_clustering``); ``tensorboard/`` scalars.

    Raises:
        ConfigError, DataError, CheckpointError: bad settings, data or checkpoint, before
            any training starts.
    """
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    run_dir = config.run_dir
    checkpoint_path = run_dir / CHECKPOINT_NAME
    if resume and not checkpoint_path.is_file():
        raise CheckpointError(f"nothing to resume: {str(checkpoint_path)!r} does not exist")
    if not resume and checkpoint_path.is_file():
        raise ConfigError(f"run folder {str(run_dir)!r} already holds a checkpoint; pass --resume to continue it "
                          "or choose another --out_dir")
    source = open_source(config)
    if config.clustering == "kmeans" and config.n_clusters > len(source):
        raise ConfigError(f"setting 'n_clusters' is {config.n_clusters} but the data has only {len(source)} images; "
                          f"choose at most {len(source)}")
    model, optimizer = build(config, device)
    state = RunState()
    if resume:
        saved = load_checkpoint(checkpoint_path)
        check_resume_config(saved["config"], config)
        state, _ = restore(checkpoint_path, model, optimizer, config)
    for item in getattr(source, "skipped", []):
        state.skipped[item.path] = item.reason
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "assignments").mkdir(exist_ok=True)
    dump_yaml(config, run_dir / "config.yaml")
    write_skipped(run_dir, state.skipped)
    labels = source.labels
    if not resume:
        (run_dir / LOG_NAME).write_text("")
    log(f"deepcluster: {len(source)} images, {config.arch}{' + sobel' if config.sobel else ''}, "
        f"k={config.n_clusters}, {config.epochs} epochs, device {device}, run folder {run_dir}"
        + (f", resuming after epoch {state.epoch}" if resume else ""))

    records = []
    clustering: Clustering | None = None
    # Flushed every epoch, so a run that stops early keeps its scalars without a close().
    scalars = ScalarLog(run_dir, config.tensorboard and distributed.is_main_process())
    for epoch in range(state.epoch, config.epochs):
        record: dict = {"epoch": epoch}
        recluster = state.previous is None or epoch % config.reassign_every == 0
        record.update(time_features=0.0, time_pca=0.0, time_kmeans=0.0, n_split=0)
        if recluster:
            start = time.perf_counter()
            features, ok = compute_features(model, source, config, device)
            record["time_features"] = time.perf_counter() - start
            for index in np.flatnonzero(~ok):
                state.skipped[source.name(int(index))] = "could not be decoded"
            if config.clustering == "kmeans" and ok.sum() < config.n_clusters:
                raise DataError(f"only {int(ok.sum())} images could be decoded, fewer than n_clusters={config.n_clusters}")
            clustering = cluster_features(features, ok, config, derived_seed(config.seed, epoch, 0))
            del features
            assignments = clustering.assignments
            model.reset_classifier(clustering.n_clusters)
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
        )
        record.update(label_scores(assignments, labels))

        start = time.perf_counter()
        loss, seen = train_one_epoch(model, optimizer, source, assignments, config, epoch, device)
        record["time_training"] = time.perf_counter() - start
        record["train_loss"] = loss
        record["train_images_per_s"] = seen * distributed.world_size() / max(record["time_training"], 1e-9)
        record["n_images"] = int((assignments >= 0).sum())
        record["n_skipped"] = len(state.skipped)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at epoch {epoch + 1}; the last good checkpoint is kept")

        state.epoch, state.previous = epoch + 1, assignments
        if distributed.is_main_process():
            np.save(run_dir / "assignments" / f"epoch_{epoch:04d}.npy", assignments.astype(np.int32), allow_pickle=False)
            write_skipped(run_dir, state.skipped)
            save_checkpoint(checkpoint_path, checkpoint_state(model, optimizer, config, state, clustering))
            with open(run_dir / LOG_NAME, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            scalars.write(record)
            log(format_line(record, config.epochs))
        records.append(record)
    scalars.close()
    if config.final_clustering and state.epoch == config.epochs:
        add_final_clustering(model, source, config, device, state, labels, redo=bool(records), log=log)
    return records


def add_final_clustering(model: Backbone, source: ImageSource, config: Config, device: torch.device,
                         state: RunState, labels: np.ndarray | None, redo: bool = True,
                         log: Callable[[str], None] = print) -> dict | None:
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
    if not redo and saved.get("final") is not None and int(saved["final"]["epoch"]) == state.epoch:
        return None
    start = time.perf_counter()
    features, ok = compute_features(model, source, config, device)
    time_features = time.perf_counter() - start
    final = cluster_features(features, ok, config, derived_seed(config.seed, state.epoch, 0))
    del features
    sizes = cluster_sizes(final.assignments, final.n_clusters)
    summary = {"epoch": state.epoch, "clustering_objective": final.objective, "n_clusters": final.n_clusters,
               "n_nonempty": sizes.n_nonempty, "largest_cluster_share": sizes.largest_share,
               "nmi_last_epoch": None if state.previous is None else nmi(state.previous, final.assignments),
               **label_scores(final.assignments, labels), "time_features": time_features,
               "time_clustering": final.time_pca + final.time_kmeans}
    if distributed.is_main_process():
        np.save(config.run_dir / "assignments" / "final.npy", final.assignments.astype(np.int32), allow_pickle=False)
        saved.pop("format_version", None)
        saved["final"] = {"epoch": state.epoch, "centroids": torch.from_numpy(final.centroids),
                          "pca_mean": torch.from_numpy(final.pca.mean),
                          "pca_projection": torch.from_numpy(final.pca.projection),
                          "assignments": torch.from_numpy(final.assignments)}
        save_checkpoint(checkpoint_path, saved)
        (config.run_dir / FINAL_NAME).write_text(json.dumps(summary) + "\n")
        parts = [f"final clustering of the trained network: {sizes.n_nonempty} clusters "
                 f"(largest {100 * sizes.largest_share:.1f}%)"]
        if summary["nmi_last_epoch"] is not None:
            parts.append(f"nmi with epoch {state.epoch}'s {summary['nmi_last_epoch']:.3f}")
        if "nmi_labels" in summary:
            parts.append(f"nmi {summary['nmi_labels']:.3f} acc {summary['acc_labels']:.3f} "
                         f"ari {summary['ari_labels']:.3f}")
        parts.append(f"time {time_features + summary['time_clustering']:.1f}s")
        log("  ".join(parts))
    return summary


def load_backbone(path: str | Path) -> tuple[Backbone, Config]:
    """The trained backbone of a checkpoint (top layer included) and its configuration."""
    saved = load_checkpoint(path)
    config = from_dict(saved["config"])
    model = create_model(config.arch, sobel=config.sobel, feature_dim=config.feature_dim)
    weights = saved["model"]
    if "top_layer.weight" in weights:
        model.reset_classifier(weights["top_layer.weight"].shape[0])
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit its architecture: {str(error).splitlines()[0]}") from None
    return model.eval(), config


__all__ = ["Clustering", "add_final_clustering", "cluster_features", "compute_features", "load_backbone", "open_source",
           "run",
           "train_one_epoch", "CheckpointError"]
