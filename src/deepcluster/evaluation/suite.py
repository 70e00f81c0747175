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

from deepcluster.config import Config, ConfigError
from deepcluster.data import CenterView, Normalize
from deepcluster.evaluation.clustering_scores import describe_widths, kmeans_clustering_scores, pca_width_scores
from deepcluster.evaluation.features import (FC_LAYER, TARGET_DIM, ExtractedFeatures, PoolSpec, extract_features,
                                             head_layers, probe_pooling)
from deepcluster.evaluation.knn import knn_classify
from deepcluster.evaluation.linear_probe import (ProbeSettings, RandomCropFlipView, train_linear_probe,
                                                 train_probes_augmented)
from deepcluster.evaluation.retrieval import retrieval_scores
from deepcluster.evaluation.splits import LabelledSplits, SubsetSource, open_labelled_splits
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
            network, learned or not) or ``init``, as initialised; ``init,data`` (either
            order) evaluates both baselines, the first one the gain is measured against.
        pca_widths: with the clustering protocol, also k-means after a PCA of each of these
            widths, whitened (-0.5) and not (0), and after L2 normalisation alone, on the
            training split (is an accuracy the PCA's whitening or the features?).
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
    pca_widths: tuple[int, ...] = ()

    @property
    def baseline_modes(self) -> tuple[str, ...]:
        """``baseline_batchnorm`` as a tuple: ``("data",)``, ``("init", "data")``, ..."""
        return tuple(item.strip() for item in self.baseline_batchnorm.split(",") if item.strip())

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
        if not out["pca_widths"]:
            out.pop("pca_widths")  # absent when unused: older reports stay comparable
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
    modes = settings.baseline_modes
    if not modes or any(mode not in BASELINE_BATCHNORM for mode in modes) or len(set(modes)) < len(modes):
        raise ConfigError(f"baseline BatchNorm statistics {settings.baseline_batchnorm!r}; give one or both of "
                          f"{', '.join(BASELINE_BATCHNORM)}, comma-separated")
    if any(width < 1 for width in settings.pca_widths):
        raise ConfigError(f"PCA widths must be positive integers, got {list(settings.pca_widths)}")
    if settings.pca_widths and "clustering" not in settings.protocols:
        raise ConfigError("PCA widths are rows of the clustering protocol; add clustering to the protocols")
    return settings


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
                      device: torch.device | str, batchnorm: str | None = None) -> Backbone:
    """The random-init baseline of an evaluation: ``random_init_backbone``, with BatchNorm
    statistics of the training split's centre views when ``batchnorm`` (default: the first
    of ``settings.baseline_modes``) is ``data`` (``features.batchnorm_statistics_of``)."""
    from deepcluster.features import PassSettings, batchnorm_statistics_of

    model = random_init_backbone(config).to(device)
    if (batchnorm or settings.baseline_modes[0]) == "data":
        batchnorm_statistics_of(model, splits.train, PassSettings(
            CenterView(config.resize, config.crop), Normalize(config.mean, config.std), settings.batch_size,
            settings.workers, torch.device(device)))
    return model


def select_probe_layers(pools: dict[str, PoolSpec], wanted: tuple[str, ...] | None,
                        others: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The layers to probe: every conv layer when ``wanted`` is None, else ``wanted``, each a
    conv layer of ``pools`` or one of ``others`` (``fc``, ``body``, ``fcN``)."""
    if wanted is None:
        return tuple(pools)
    unknown = [name for name in wanted if name not in pools and name not in others]
    if unknown:
        raise ConfigError(f"unknown probe layer(s) {', '.join(unknown)}; this backbone has "
                          f"{', '.join([*pools, *others])}")
    return tuple(wanted)


@dataclass(frozen=True)
class LayerPlan:
    """The layers one evaluation reads.

    Attributes:
        pools: the pooling of every conv layer of the backbone (for the report).
        probe: the layers the linear probes read.
        features: the layers kNN, clustering and retrieval read.
        cached: the conv layers the feature pass keeps, with their pooling.
        heads: the ``body`` / ``fcN`` layers the feature pass keeps.
        include_fc: whether it keeps ``fc``.
    """

    pools: dict[str, PoolSpec]
    probe: tuple[str, ...]
    features: tuple[str, ...]
    cached: dict[str, PoolSpec]
    heads: tuple[str, ...]
    include_fc: bool


def plan_layers(model: Backbone, image_size: int, settings: EvalSettings) -> LayerPlan:
    """Check the asked layers against the backbone and decide what the feature pass keeps.

    Raises:
        ConfigError: an unknown layer, or a layer past the convolutions probed in reference
            mode (its augmented probes read conv layers only).
    """
    pools = probe_pooling(model, image_size, settings.pool_dim)
    others = (FC_LAYER, *head_layers(model))
    probe: tuple[str, ...] = ()
    if "linear" in settings.protocols:
        probe = select_probe_layers(pools, settings.probe_layers, others)
        if settings.probe_mode == "reference" and any(name not in pools for name in probe):
            raise ConfigError(f"reference probe mode probes conv layers only ({', '.join(pools)}); use --probe-mode "
                              "fast for fc and body")
    on_features = any(p in ("knn", "clustering", "retrieval") for p in settings.protocols)
    features = tuple(settings.feature_layers) if on_features else ()
    unknown = [name for name in features if name not in pools and name not in others]
    if unknown:
        raise ConfigError(f"unknown feature layer(s) {', '.join(unknown)}; choose one of "
                          f"{', '.join([*others, *pools])}")
    kept = set(features) | (set(probe) if settings.probe_mode == "fast" else set())
    return LayerPlan(pools, probe, features, {name: spec for name, spec in pools.items() if name in kept},
                     tuple(name for name in others[1:] if name in kept), FC_LAYER in kept)


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
        (per feature layer), ``pca_widths`` (per feature layer, with ``settings.pca_widths``),
        ``pooling``, ``n_unreadable``, ``seconds``.
    """
    check_settings(settings)
    device = torch.device(device)
    model = model.to(device).eval()
    plan = plan_layers(model, config.crop, settings)
    results: dict[str, Any] = {"seconds": {}, "pooling": {name: spec.describe() for name, spec in plan.pools.items()}}
    data: dict[str, SplitFeatures] = {}
    try:
        if plan.cached or plan.heads or plan.include_fc:
            data = extract_splits(model, config, splits, settings, plan, device, work_dir, log)
            results["seconds"].update({f"features_{split}": round(features.extracted.seconds, 1)
                                       for split, features in data.items()})
            results["n_unreadable"] = {split: int((~features.extracted.ok).sum()) for split, features in data.items()}
        if "linear" in settings.protocols:
            start = time.perf_counter()
            results["linear"] = run_linear_probes(model, config, splits, settings, plan, data, device, log)
            results["seconds"]["linear"] = round(time.perf_counter() - start, 1)
        results.update(run_feature_protocols(config, splits, settings, plan.features, data, device, results["seconds"],
                                             log))
    finally:
        if work_dir is not None and not keep_features:
            for split, features in data.items():
                for name in features.extracted.layers:
                    (Path(work_dir) / f"{split}_{name}.npy").unlink(missing_ok=True)
    return results


def extract_splits(model: Backbone, config: Config, splits: LabelledSplits, settings: EvalSettings, plan: LayerPlan,
                   device: torch.device, work_dir: str | Path | None,
                   log: Callable[[str], None]) -> dict[str, SplitFeatures]:
    """One feature pass per split, keeping the layers of ``plan``."""
    view, normalize = CenterView(config.resize, config.crop), Normalize(config.mean, config.std)
    data: dict[str, SplitFeatures] = {}
    for split, source, labels in (("train", splits.train, splits.train_labels), ("val", splits.val, splits.val_labels)):
        storage = None if work_dir is None else Path(work_dir)
        extracted = extract_features(model, source, view, normalize, plan.cached, plan.include_fc, settings.batch_size,
                                     settings.workers, device, config.channels_last, storage, f"{split}_", log,
                                     heads=plan.heads)
        data[split] = SplitFeatures(extracted, labels)
        log(f"  features {split}: {len(source)} images in {extracted.seconds:.0f}s, "
            f"layers {', '.join(extracted.layers)}")
    return data


def run_feature_protocols(config: Config, splits: LabelledSplits, settings: EvalSettings, layers: tuple[str, ...],
                          data: dict[str, SplitFeatures], device: torch.device, seconds: dict[str, float],
                          log: Callable[[str], None]) -> dict[str, Any]:
    """kNN, clustering (and its PCA widths) and retrieval, as asked, on every layer of ``layers``."""
    results: dict[str, Any] = {}
    for protocol in [p for p in settings.protocols if p in ("knn", "clustering", "retrieval")]:
        start = time.perf_counter()
        per_layer: dict[str, Any] = {}
        widths: dict[str, Any] = {}
        for name in layers:
            train_x, train_y = data["train"].layer(name)
            val_x, val_y = data["val"].layer(name)
            per_layer[name] = run_feature_protocol(protocol, name, train_x, train_y, val_x, val_y, splits.n_classes,
                                                   config, settings, device, log)
            if protocol == "clustering" and settings.pca_widths:
                widths[name] = pca_width_scores(train_x, train_y, splits.n_classes, settings.pca_widths,
                                                settings.cluster_iters, tuple(range(settings.cluster_seeds)))
                log(f"  clustering {name}, train ACC by PCA width: " + describe_widths(widths[name]))
        results[protocol] = per_layer
        if widths:
            results["pca_widths"] = widths
        seconds[protocol] = round(time.perf_counter() - start, 1)
    return results


def run_linear_probes(model: Backbone, config: Config, splits: LabelledSplits, settings: EvalSettings,
                      plan: LayerPlan, data: dict[str, SplitFeatures], device: torch.device,
                      log: Callable[[str], None]) -> dict[str, Any]:
    """The linear probe of every layer of ``plan.probe``, fast (on ``data``) or reference mode."""
    layers: dict[str, Any] = {}
    if settings.probe_mode == "fast":
        for name in plan.probe:
            pooling = plan.pools[name].describe() if name in plan.pools else "none"
            log(f"  linear probe {name} ({pooling}), fast mode, {settings.probe.epochs} epochs")
            train_x, train_y = data["train"].layer(name, copy=False)  # the probe only reads its inputs
            val_x, val_y = data["val"].layer(name, copy=False)
            dim = int(train_x.shape[1])
            outcome = train_linear_probe(train_x, train_y, val_x, val_y, splits.n_classes, settings.probe)
            del train_x, val_x
            layers[name] = {"pooling": pooling, "dim": dim, **dataclasses.asdict(outcome)}
            log(f"    {name}: top-1 {outcome.top1:.2f}% top-5 {outcome.top5:.2f}% (last epoch), "
                f"best {outcome.best_top1:.2f}% (epoch {outcome.best_epoch}, selected on val), {outcome.seconds:.0f}s")
    else:
        pools = {name: plan.pools[name] for name in plan.probe}
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


__all__ = ["BASELINE_BATCHNORM", "EvalSettings", "LabelledSplits", "LayerPlan", "PROBE_MODES", "PROTOCOLS",
           "SplitFeatures", "SubsetSource", "baseline_backbone", "check_settings", "evaluate_backbone",
           "extract_splits", "open_labelled_splits", "plan_layers", "random_init_backbone", "remove_dir",
           "run_feature_protocol", "run_feature_protocols", "run_linear_probes", "select_probe_layers"]
