"""The evaluation suite: one backbone, a labelled train/validation pair, every protocol.

``evaluate_backbone`` wires the pure functions of this package together: one eval-mode
feature pass per split (every needed layer at once, written to disk when a folder is
given), then the linear probes, kNN, clustering scores and retrieval on those features.
``random_init_backbone`` builds the network every report compares with: the checkpoint's
architecture with random weights drawn from the run's seed, i.e. exactly the network the
training started from; ``baseline_backbone`` gives it the BatchNorm statistics of the
training split by default (``baseline_batchnorm``), which any training would leave in it.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from deepcluster.config import Config, ConfigError
from deepcluster.data import CenterView, DataError, FolderSource, ImageSource, Normalize
from deepcluster.evaluation.clustering_scores import kmeans_clustering_scores
from deepcluster.evaluation.features import (FC_LAYER, TARGET_DIM, ExtractedFeatures, PoolSpec, extract_features,
                                             probe_pooling)
from deepcluster.evaluation.knn import knn_classify
from deepcluster.evaluation.linear_probe import (ProbeSettings, RandomCropFlipView, train_linear_probe,
                                                 train_probes_augmented)
from deepcluster.evaluation.retrieval import retrieval_scores
from deepcluster.models import Backbone, model_from_config

PROTOCOLS = ("linear", "knn", "clustering", "retrieval")
PROBE_MODES = ("fast", "reference")
# The random-init baseline's BatchNorm statistics: of the training split (``data``, the
# default) or as initialised (``init``: mean 0, variance 1, the network a run starts from).
BASELINE_BATCHNORM = ("data", "init")


@dataclass(frozen=True)
class EvalSettings:
    """Every setting of an evaluation; the defaults are the protocols' usual values.

    Attributes:
        protocols: subset of ``linear``, ``knn``, ``clustering``, ``retrieval``.
        probe_mode: ``fast`` (cached centre-view features, no augmentation) or
            ``reference`` (the backbone runs on augmented views at every step).
        probe_layers: conv layers probed; ``None`` = every conv layer.
        probe: optimisation of the probes (lr 0.01, momentum 0.9, 90 epochs, ...).
        pool_dim: target length of each probed layer's pooled vector (9,000).
        feature_layers: layers kNN, clustering and retrieval use: ``fc`` (the features
            DeepCluster clusters) and/or conv layers (pooled as for the probe).
        knn_k, knn_temperature: weighted kNN (20, 0.07).
        cluster_pca_dim: PCA before k-means; ``None`` = the checkpoint's ``pca_dim`` (as
            DeepCluster clusters), 0 = L2 normalisation only.
        cluster_whiten: exponent of the eigenvalues in that PCA: 0 (default) rotates and
            reduces only, -0.5 whitens as DeepCluster does before its own k-means. Not
            whitened by default: at k = number of classes whitening lets the many
            low-variance directions outweigh the few that separate classes, and the accuracy
            then swings with the PCA width more than with training (docs/notebook/2026-11-30.md).
        cluster_seeds: k-means restarts (seeds 0..n-1), averaged.
        cluster_iters: Lloyd iterations per restart.
        retrieval_ks: cut-offs of precision@k.
        train_limit, val_limit: evaluate on a random subset of this many images per split.
        subset_seed: draws those subsets.
        batch_size: images per forward pass.
        workers: data-loading processes.
        baseline_batchnorm: the random-init baseline's BatchNorm statistics: ``data``, of
            the training split (one pass, no gradient: what any training leaves in the
            network, learned or not) or ``init``, as initialised.
    """

    protocols: tuple[str, ...] = PROTOCOLS
    probe_mode: str = "fast"
    probe_layers: tuple[str, ...] | None = None
    probe: ProbeSettings = ProbeSettings()
    pool_dim: int = TARGET_DIM
    feature_layers: tuple[str, ...] = (FC_LAYER,)
    knn_k: int = 20
    knn_temperature: float = 0.07
    cluster_pca_dim: int | None = None
    cluster_whiten: float = 0.0
    cluster_seeds: int = 5
    cluster_iters: int = 50
    retrieval_ks: tuple[int, ...] = (1, 10, 100)
    train_limit: int | None = None
    val_limit: int | None = None
    subset_seed: int = 0
    batch_size: int = 256
    workers: int = 2
    baseline_batchnorm: str = "data"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    def result_defining(self) -> dict[str, Any]:
        """The settings that change the numbers (not batch size or workers)."""
        out = self.to_dict()
        for key in ("batch_size", "workers"):
            out.pop(key)
        return out


def check_settings(settings: EvalSettings) -> EvalSettings:
    """Raise ``ConfigError`` naming the first bad setting."""
    unknown = [p for p in settings.protocols if p not in PROTOCOLS]
    if unknown or not settings.protocols:
        raise ConfigError(f"unknown protocol(s) {', '.join(unknown) or '(none given)'}; "
                          f"choose from: {', '.join(PROTOCOLS)}")
    if settings.probe_mode not in PROBE_MODES:
        raise ConfigError(f"probe mode {settings.probe_mode!r}; choose one of: {', '.join(PROBE_MODES)}")
    positive = {"probe epochs": settings.probe.epochs, "probe batch size": settings.probe.batch_size,
                "pool dim": settings.pool_dim, "knn k": settings.knn_k, "cluster seeds": settings.cluster_seeds,
                "cluster iters": settings.cluster_iters, "batch size": settings.batch_size}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    if not settings.probe.lr > 0 or not 0 <= settings.probe.momentum < 1 or settings.probe.weight_decay < 0:
        raise ConfigError("probe lr must be > 0, momentum in [0, 1) and weight decay >= 0")
    if not settings.knn_temperature > 0:
        raise ConfigError(f"knn temperature must be positive, got {settings.knn_temperature}")
    if settings.cluster_pca_dim is not None and settings.cluster_pca_dim < 0:
        raise ConfigError(f"cluster PCA dimension must be >= 0, got {settings.cluster_pca_dim}")
    if not -1 <= settings.cluster_whiten <= 0:
        raise ConfigError(f"cluster whitening must be between -1 and 0 (-0.5 whitens, 0 does not), "
                          f"got {settings.cluster_whiten:g}")
    if not settings.retrieval_ks or min(settings.retrieval_ks) < 1:
        raise ConfigError(f"retrieval cut-offs must be positive integers, got {list(settings.retrieval_ks)}")
    for name in ("train_limit", "val_limit"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name.replace('_', ' ')} must be a positive integer, got {value}")
    if settings.workers < 0:
        raise ConfigError(f"workers must be >= 0, got {settings.workers}")
    if not settings.feature_layers:
        raise ConfigError("give at least one feature layer for kNN, clustering and retrieval")
    if settings.baseline_batchnorm not in BASELINE_BATCHNORM:
        raise ConfigError(f"baseline BatchNorm statistics {settings.baseline_batchnorm!r}; choose one of: "
                          f"{', '.join(BASELINE_BATCHNORM)}")
    return settings


class SubsetSource(ImageSource):
    """The images ``indices`` of another source, with their labels."""

    def __init__(self, source: ImageSource, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
        self.labels = None if source.labels is None else source.labels[self.indices]
        self.class_names = source.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.source.load(int(self.indices[index]))

    def name(self, index: int) -> str:
        return self.source.name(int(self.indices[index]))


@dataclass
class LabelledSplits:
    """A training and a validation split with labels in one class numbering."""

    train: ImageSource
    train_labels: np.ndarray
    val: ImageSource
    val_labels: np.ndarray
    class_names: list[str]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def _limit(source: ImageSource, limit: int | None, seed: int) -> ImageSource:
    if limit is None or limit >= len(source):
        return source
    chosen = np.sort(np.random.default_rng(seed).choice(len(source), limit, replace=False))
    return SubsetSource(source, chosen)


def open_labelled_splits(train_dir: str | Path, val_dir: str | Path, train_limit: int | None = None,
                         val_limit: int | None = None, seed: int = 0) -> LabelledSplits:
    """Open two class-folder trees; validation classes are mapped to the training numbering.

    Raises:
        DataError: a folder is missing, unlabelled (no class sub-folders), has fewer than
            two classes, or the validation split has a class the training split lacks.
    """
    sources = {}
    for split, folder in (("training", train_dir), ("validation", val_dir)):
        source = FolderSource(folder)
        if source.labels is None or source.class_names is None:
            raise DataError(f"{split} folder {str(folder)!r} has no class labels: {source.unlabelled}; evaluation "
                            "needs them")
        sources[split] = source
    train, val = sources["training"], sources["validation"]
    class_names = list(train.class_names)
    if len(class_names) < 2:
        raise DataError(f"training folder {str(train_dir)!r} has {len(class_names)} class; evaluation needs at least 2")
    missing = sorted(set(val.class_names) - set(class_names))
    if missing:
        raise DataError(f"validation classes {', '.join(missing[:5])} are not in the training folder "
                        f"{str(train_dir)!r}")
    remap = np.array([class_names.index(name) for name in val.class_names], dtype=np.int64)
    train_subset = _limit(train, train_limit, seed)
    val_subset = _limit(val, val_limit, seed + 1)
    return LabelledSplits(train_subset, np.asarray(train_subset.labels, dtype=np.int64),
                          val_subset, remap[np.asarray(val_subset.labels)], class_names)


def random_init_backbone(config: Config, seed: int | None = None) -> Backbone:
    """The checkpoint's architecture with random weights, in eval mode.

    Drawn after ``torch.manual_seed(seed or config.seed)``, as ``deepcluster.train.build``
    does, so it is the very network the run started from; the global random state is left
    as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed if seed is None else seed)
        model = model_from_config(config)
    return model.eval()


def baseline_backbone(config: Config, splits: LabelledSplits, settings: EvalSettings,
                      device: torch.device | str) -> Backbone:
    """The random-init baseline of an evaluation: ``random_init_backbone``, with BatchNorm
    statistics of the training split's centre views when ``settings.baseline_batchnorm`` is
    ``data`` (``features.batchnorm_statistics_of``)."""
    from deepcluster.features import PassSettings, batchnorm_statistics_of

    model = random_init_backbone(config).to(device)
    if settings.baseline_batchnorm == "data":
        batchnorm_statistics_of(model, splits.train, PassSettings(
            CenterView(config.resize, config.crop), Normalize(config.mean, config.std), settings.batch_size,
            settings.workers, torch.device(device)))
    return model


def select_probe_layers(pools: dict[str, PoolSpec], wanted: tuple[str, ...] | None) -> dict[str, PoolSpec]:
    """The pooling of the asked conv layers (all when ``wanted`` is None)."""
    if wanted is None:
        return dict(pools)
    unknown = [name for name in wanted if name not in pools]
    if unknown:
        raise ConfigError(f"unknown probe layer(s) {', '.join(unknown)}; this backbone has {', '.join(pools)}")
    return {name: pools[name] for name in wanted}


@dataclass
class SplitFeatures:
    """The extracted features of one split, read one layer at a time.

    Attributes:
        extracted: every layer of every image (possibly memory maps on disk).
        labels: ``(N,)`` classes of every image.
    """

    extracted: ExtractedFeatures
    labels: np.ndarray

    @property
    def usable(self) -> np.ndarray:
        """Indices of the images that decoded."""
        return np.flatnonzero(self.extracted.ok)

    def layer(self, name: str, copy: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(n_usable, dim)`` float32 features of ``name`` and their ``(n_usable,)`` labels.

        Args:
            name: the layer.
            copy: ``True``: a private array in RAM, free to modify. ``False``, for readers
                that never write: when every image decoded, the stored array itself (on disk,
                a memory map whose pages the system may drop and read again), so that no
                copy of a layer (1.8 GB for 50,000 images) is made at all.
        """
        usable = self.usable
        stored = self.extracted.layers[name]
        if len(usable) == len(stored):
            return (np.array(stored) if copy else stored), self.labels
        return stored[usable], self.labels[usable]  # fancy indexing makes the one copy


def evaluate_backbone(model: Backbone, config: Config, splits: LabelledSplits, settings: EvalSettings,
                      device: torch.device | str = "cpu", work_dir: str | Path | None = None,
                      keep_features: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every asked protocol on one backbone.

    Args:
        model: the backbone, frozen: eval mode, never updated.
        config: its run configuration (image size, normalisation, ``pca_dim``).
        splits: labelled training and validation images.
        settings: what to run (see ``EvalSettings``).
        device: where the backbone runs.
        work_dir: when given, features are written there as ``.npy`` memory maps and read
            back one layer at a time (all conv layers of CIFAR-10's 50,000 training images
            take about 10 GB), then removed unless ``keep_features``.
        keep_features: keep the feature files in ``work_dir``.
        log: progress lines.

    Returns:
        A JSON-ready dict: ``linear`` (per layer), ``knn``, ``clustering``, ``retrieval``
        (per feature layer), ``pooling``, ``n_unreadable``, ``seconds``.
    """
    check_settings(settings)
    device = torch.device(device)
    model = model.to(device).eval()
    view = CenterView(config.resize, config.crop)
    normalize = Normalize(config.mean, config.std)
    all_pools = probe_pooling(model, config.crop, settings.pool_dim)
    probe_pools = select_probe_layers(all_pools, settings.probe_layers) if "linear" in settings.protocols else {}
    on_features = [p for p in settings.protocols if p in ("knn", "clustering", "retrieval")]
    feature_layers = list(settings.feature_layers) if on_features else []
    unknown = [name for name in feature_layers if name != FC_LAYER and name not in all_pools]
    if unknown:
        raise ConfigError(f"unknown feature layer(s) {', '.join(unknown)}; choose fc or one of {', '.join(all_pools)}")
    cached = dict(probe_pools) if settings.probe_mode == "fast" else {}
    cached.update({name: all_pools[name] for name in feature_layers if name != FC_LAYER})
    include_fc = FC_LAYER in feature_layers
    results: dict[str, Any] = {"seconds": {}, "pooling": {name: spec.describe() for name, spec in all_pools.items()}}
    data: dict[str, SplitFeatures] = {}
    try:
        if cached or include_fc:
            for split, source, labels in (("train", splits.train, splits.train_labels),
                                          ("val", splits.val, splits.val_labels)):
                storage = None if work_dir is None else Path(work_dir)
                extracted = extract_features(model, source, view, normalize, cached, include_fc, settings.batch_size,
                                             settings.workers, device, config.channels_last, storage, f"{split}_",
                                             log)
                data[split] = SplitFeatures(extracted, labels)
                results["seconds"][f"features_{split}"] = round(extracted.seconds, 1)
                log(f"  features {split}: {len(source)} images in {extracted.seconds:.0f}s, "
                    f"layers {', '.join(extracted.layers)}")
            results["n_unreadable"] = {split: int((~features.extracted.ok).sum()) for split, features in data.items()}
        n_classes = splits.n_classes
        if "linear" in settings.protocols:
            start = time.perf_counter()
            results["linear"] = run_linear_probes(model, config, splits, settings, probe_pools, data, device, log)
            results["seconds"]["linear"] = round(time.perf_counter() - start, 1)
        for protocol in on_features:
            start = time.perf_counter()
            per_layer: dict[str, Any] = {}
            for name in feature_layers:
                train_x, train_y = data["train"].layer(name)
                val_x, val_y = data["val"].layer(name)
                per_layer[name] = run_feature_protocol(protocol, name, train_x, train_y, val_x, val_y, n_classes,
                                                       config, settings, device, log)
            results[protocol] = per_layer
            results["seconds"][protocol] = round(time.perf_counter() - start, 1)
    finally:
        if work_dir is not None and not keep_features:
            for split, features in data.items():
                for name in features.extracted.layers:
                    (Path(work_dir) / f"{split}_{name}.npy").unlink(missing_ok=True)
    return results


def run_linear_probes(model: Backbone, config: Config, splits: LabelledSplits, settings: EvalSettings,
                      pools: dict[str, PoolSpec], data: dict[str, SplitFeatures], device: torch.device,
                      log: Callable[[str], None]) -> dict[str, Any]:
    """The linear probe of every layer in ``pools``, fast (on ``data``) or reference mode."""
    layers: dict[str, Any] = {}
    if settings.probe_mode == "fast":
        for name, spec in pools.items():
            log(f"  linear probe {name} ({spec.describe()}), fast mode, {settings.probe.epochs} epochs")
            train_x, train_y = data["train"].layer(name, copy=False)  # the probe only reads its inputs
            val_x, val_y = data["val"].layer(name, copy=False)
            outcome = train_linear_probe(train_x, train_y, val_x, val_y, splits.n_classes, settings.probe)
            del train_x, val_x
            layers[name] = {"pooling": spec.describe(), "dim": spec.dim, **dataclasses.asdict(outcome)}
            log(f"    {name}: top-1 {outcome.top1:.2f}% top-5 {outcome.top5:.2f}% (last epoch), "
                f"best {outcome.best_top1:.2f}% (epoch {outcome.best_epoch}, selected on val), {outcome.seconds:.0f}s")
    else:
        log(f"  linear probes {', '.join(pools)}, reference mode (augmented), {settings.probe.epochs} epochs")
        outcomes = train_probes_augmented(model, splits.train, splits.train_labels, splits.val, splits.val_labels,
                                          splits.n_classes, pools, RandomCropFlipView(config.resize, config.crop),
                                          CenterView(config.resize, config.crop), Normalize(config.mean, config.std),
                                          settings.probe, device, settings.workers, log)
        for name, outcome in outcomes.items():
            layers[name] = {"pooling": pools[name].describe(), "dim": pools[name].dim, **dataclasses.asdict(outcome)}
    return {"mode": settings.probe_mode, "settings": dataclasses.asdict(settings.probe), "layers": layers}


def run_feature_protocol(protocol: str, layer: str, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                         val_y: np.ndarray, n_classes: int, config: Config, settings: EvalSettings,
                         device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """kNN, clustering scores or retrieval on one layer's features, as a JSON-ready dict."""
    if protocol == "knn":
        outcome = knn_classify(train_x, train_y, val_x, val_y, n_classes, settings.knn_k, settings.knn_temperature,
                               device=device)
        log(f"  kNN {layer}: top-1 {outcome.top1:.2f}% (k={outcome.k}, T={outcome.temperature})")
        return dataclasses.asdict(outcome)
    if protocol == "clustering":
        pca_dim = config.pca_dim if settings.cluster_pca_dim is None else settings.cluster_pca_dim
        outcome = kmeans_clustering_scores(train_x, train_y, val_x, val_y, n_classes, pca_dim, settings.cluster_whiten,
                                           settings.cluster_iters, tuple(range(settings.cluster_seeds)))
        log(f"  clustering {layer}: train ACC {outcome.train.acc:.2f}% NMI {outcome.train.nmi:.3f} "
            f"ARI {outcome.train.ari:.3f}; val ACC {outcome.val.acc:.2f}%")
        return dataclasses.asdict(outcome)
    outcome = retrieval_scores(train_x, train_y, val_x, val_y, settings.retrieval_ks, device=device)
    log(f"  retrieval {layer}: mAP {outcome.mean_ap:.2f}%")
    return {"map": outcome.mean_ap, "precision_at": {str(k): v for k, v in outcome.precision_at.items()},
            "n_gallery": outcome.n_gallery, "n_query": outcome.n_query}


def remove_dir(path: str | Path) -> None:
    """Remove a feature folder this suite created (ignores a missing one)."""
    shutil.rmtree(path, ignore_errors=True)


__all__ = ["BASELINE_BATCHNORM", "EvalSettings", "LabelledSplits", "PROBE_MODES", "PROTOCOLS", "SplitFeatures",
           "SubsetSource", "baseline_backbone", "check_settings", "evaluate_backbone", "open_labelled_splits",
           "random_init_backbone", "remove_dir",
           "run_feature_protocol", "run_linear_probes", "select_probe_layers"]
