"""Use a trained run on new images: cluster them without retraining, or extract features.

Assigning an image follows the clustering pipeline of ``train`` step by step, with the
clustering saved in the checkpoint:

1. features: the backbone in eval mode on the centre view (``deepcluster.features``, the
   same batches, precision and memory layout as the run);
2. the saved PCA: ``(x - pca_mean) @ pca_projection`` (projection includes the whitening);
3. L2 normalisation of each row;
4. the nearest saved centroid (the run's k-means search backend), and its distance.

A v2 run (``method: v2``) clusters the L2-normalised embeddings of its projection head
instead: steps 2-3 are the projection, and step 4 is the centroid of largest dot product
(the spherical k-means rule); the distance is the Euclidean one on the unit sphere.

Which clustering: a finished run saves a *final clustering* of its trained network
(``methods.v1.V1Planner.final_clustering``); its centroids and PCA fit the saved weights, and ``assign``
on the training images reproduces ``assignments/final.npy`` exactly. Without it (a run
stopped early, or ``final_clustering: false``) the last epoch's clustering is used, with a
caveat: it was computed from the weights at the *start* of that epoch, and the checkpoint
holds those at its *end*; on CIFAR-10 (small recipe, 10 epochs) such stale centroids keep only
19% of the training images in their cluster and fill 83 of 100 clusters.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepcluster.checkpoint import CheckpointError, load_checkpoint
from deepcluster.clustering import nearest_centroid
from deepcluster.clustering.pca import PCA
from deepcluster.config import Config
from deepcluster.data import ImageSource
from deepcluster.models import Backbone
from deepcluster.models.projection import Embedder
from deepcluster.checkpoint import load_backbone
from deepcluster.features import compute_features

# Images per feature pass of ``assign_images``: bounds memory on large folders (ImageNet's
# 4096-d features are 21 GB at once). Rounded up to whole feature batches, so the batches are
# those of the run's own feature pass.
CHUNK_IMAGES = 65536


@dataclass
class ClusterModel:
    """What placing new images needs, read from one checkpoint.

    Attributes:
        model: the backbone in eval mode.
        config: the run's configuration (views, normalisation, precision, search backend).
        pca: the projection fitted at the last clustering (``mean`` ``(D,)``, ``projection``
            ``(D, d)``); None for v2 (``model`` then gives the unit embeddings).
        centroids: ``(k, d)`` float32 centroids of the last clustering, in the PCA space.
        epoch: epochs the checkpoint has completed.
        assignments: ``(N,)`` labels of the training images under this clustering, or ``None``.
        final: True for the final clustering (fits the weights), False for the last epoch's.
    """

    model: Backbone | Embedder
    config: Config
    pca: PCA | None
    centroids: np.ndarray
    epoch: int
    assignments: np.ndarray | None
    final: bool = False

    @property
    def n_clusters(self) -> int:
        return len(self.centroids)


def pca_from_checkpoint(mean: np.ndarray, projection: np.ndarray, whiten_power: float) -> PCA:
    """Rebuild the saved PCA; eigenvalues follow from the column norms of the projection
    (each column is a unit eigenvector scaled by ``eigenvalue ** whiten_power``)."""
    norms = np.linalg.norm(projection, axis=0)
    if whiten_power != 0:
        eigenvalues = np.maximum(norms, 1e-300) ** (1.0 / whiten_power)
    else:
        eigenvalues = np.full(projection.shape[1], np.nan)
    return PCA(mean, projection, eigenvalues, whiten_power)


def load_cluster_model(path: str | Path, device: torch.device | str = "cpu") -> ClusterModel:
    """Backbone, PCA and centroids of a checkpoint, ready for :func:`assign_images`.

    Raises:
        CheckpointError: unreadable checkpoint, or one saved before any clustering.
    """
    model, config = load_backbone(path)
    saved = load_checkpoint(path)
    from deepcluster.methods.registry import METHODS

    if METHODS[config.method].assigns_by_prototypes:
        return _load_v2(path, model, config, saved, device)
    final = saved.get("final")
    if isinstance(final, dict) and int(final.get("epoch", -1)) == int(saved.get("epoch", 0)):
        saved = {**final, "epoch": saved.get("epoch", 0)}
    else:
        final = None
    missing = [key for key in ("centroids", "pca_mean", "pca_projection") if saved.get(key) is None]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no clustering ({', '.join(missing)} missing); "
                              "it must come from a run that finished at least one epoch")
    pca = pca_from_checkpoint(saved["pca_mean"].numpy(), saved["pca_projection"].numpy(), config.whiten_power)
    centroids = saved["centroids"].numpy().astype(np.float32)
    if centroids.ndim != 2 or centroids.shape[1] != pca.n_components or pca.mean.shape[0] != model.clustered_dim:
        raise CheckpointError(f"checkpoint {str(path)!r} has inconsistent clustering shapes: centroids "
                              f"{tuple(centroids.shape)}, PCA {tuple(pca.projection.shape)}, features "
                              f"{model.clustered_dim}")
    previous = saved.get("assignments")
    return ClusterModel(model.to(device), config, pca, centroids, int(saved.get("epoch", 0)),
                        None if previous is None else previous.numpy().astype(np.int64), final is not None)


def _load_v2(path: str | Path, backbone: Backbone, config: Config, saved: dict,
             device: torch.device | str) -> ClusterModel:
    """A v2 checkpoint's embedder and centroids: the final clustering's when it fits the
    weights, else the prototypes of head 0 (the last epoch's centroids)."""
    from deepcluster.checkpoint import load_weights
    from deepcluster.models.projection import ProjectionHead

    projection = ProjectionHead(backbone.feature_dim, config.projection_hidden, config.projection_dim)
    head = saved.get("head") or {}
    load_weights(projection, {name[len("projection."):]: tensor for name, tensor in head.items()
                              if name.startswith("projection.")}, path)
    final = saved.get("final")
    if isinstance(final, dict) and int(final.get("epoch", -1)) == int(saved.get("epoch", 0)):
        centroids, assignments = final.get("centroids"), final.get("assignments")
    else:
        final, centroids, assignments = None, head.get("prototypes.heads.0.weight"), saved.get("assignments")
    if int(saved.get("epoch", 0)) < 1 or not isinstance(centroids, torch.Tensor) or centroids.dim() != 2 \
            or centroids.shape[1] != config.projection_dim:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no clustering of its {config.projection_dim}-d "
                              "embeddings; it must come from a v2 run that finished at least one epoch")
    embedder = Embedder(backbone, projection).eval()
    return ClusterModel(embedder.to(device), config, None, centroids.numpy().astype(np.float32),
                        int(saved.get("epoch", 0)),
                        None if assignments is None else assignments.numpy().astype(np.int64), final is not None)


@dataclass
class Assignment:
    """Clusters of a set of images.

    Attributes:
        clusters: ``(N,)`` int64 nearest centroid, -1 for images that could not be decoded.
        distances: ``(N,)`` float32 Euclidean distance to that centroid in the whitened,
            L2-normalised space (between 0 and 2 for k-means centroids); NaN where unreadable.
        ok: ``(N,)`` bool, False where the image could not be decoded.
    """

    clusters: np.ndarray
    distances: np.ndarray
    ok: np.ndarray


def assign_features(features: np.ndarray, ok: np.ndarray, pca: PCA | None, centroids: np.ndarray,
                    backend: str = "faiss", device: str = "cpu") -> Assignment:
    """Nearest centroid of each usable row of ``(N, D)`` raw features (steps 2-4 above).

    Args:
        features: ``(N, D)`` backbone features (``forward_features``).
        ok: ``(N,)`` bool, rows to place (others get cluster -1).
        pca: the saved projection; None for v2 (``features`` are then unit embeddings).
        centroids: ``(k, d)`` saved centroids.
        backend: ``faiss`` or ``torch`` nearest-centroid search (use the run's for exactness).
        device: where the search runs.
    """
    clusters = np.full(len(features), -1, dtype=np.int64)
    distances = np.full(len(features), np.nan, dtype=np.float32)
    if ok.any() and pca is None:  # v2: unit embeddings, the centroid of largest dot product
        labels, cosines = nearest_centroid(features[ok], centroids, backend="torch", metric="cosine")
        clusters[ok] = labels
        distances[ok] = np.sqrt(np.maximum(2.0 - 2.0 * cosines, 0.0))
    elif ok.any():
        points = pca.project(features[ok])
        labels, squared = nearest_centroid(points, centroids, backend=backend, device=device)
        clusters[ok] = labels
        distances[ok] = np.sqrt(np.maximum(squared, 0.0))
    return Assignment(clusters, distances, ok.copy())


class _Rows(ImageSource):
    """Images ``start .. stop - 1`` of another source."""

    def __init__(self, source: ImageSource, start: int, stop: int) -> None:
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def load(self, index: int):
        return self.source.load(self.start + index)


def assign_images(cluster_model: ClusterModel, source: ImageSource, device: torch.device | str = "cpu",
                  batch_size: int | None = None, workers: int | None = None,
                  chunk_images: int = CHUNK_IMAGES) -> Assignment:
    """Cluster every image of ``source`` with the checkpoint's PCA and centroids.

    Args:
        cluster_model: from :func:`load_cluster_model`.
        source: the images, e.g. ``FolderSource(folder)``.
        device: where the backbone runs.
        batch_size, workers: feature pass; default the run's ``feature_batch_size`` and
            ``workers`` (the run's batch size reproduces its feature pass bit for bit).
        chunk_images: images per feature pass (bounds memory); rounded up to whole batches.
    """
    config = cluster_model.config
    overrides = {"device": str(device)}
    if batch_size is not None:
        overrides["feature_batch_size"] = batch_size
    if workers is not None:
        overrides["workers"] = workers
    config = dataclasses.replace(config, **overrides)
    device = torch.device(device)
    model = cluster_model.model.to(device).eval()
    if config.channels_last:  # as the run's own model (see train.build): same kernels, same numbers
        model = model.to(memory_format=torch.channels_last)
    chunk = math.ceil(max(chunk_images, 1) / config.feature_batch_size) * config.feature_batch_size
    parts = []
    search_device = "cpu" if config.kmeans_backend == "faiss" else str(device)
    for start in range(0, len(source), chunk):
        rows = _Rows(source, start, min(start + chunk, len(source)))
        features, ok, _ = compute_features(model, rows, config, device)
        parts.append(assign_features(features, ok, cluster_model.pca, cluster_model.centroids,
                                     config.kmeans_backend, search_device))
    return Assignment(np.concatenate([p.clusters for p in parts]), np.concatenate([p.distances for p in parts]),
                      np.concatenate([p.ok for p in parts]))




@dataclass
class FeatureFile:
    """Features written by :func:`write_features`.

    Attributes:
        path: the ``(N, dim)`` float32 ``.npy`` file (rows of unreadable images are zero).
        layer: ``fc`` (what DeepCluster clusters) or a conv layer name.
        dim: width of a row.
        ok: ``(N,)`` bool, False where the image could not be decoded.
        pooling: how a conv layer was pooled (``None`` for ``fc``).
        whitened: the checkpoint's PCA-whitening and L2 normalisation were applied.
    """

    path: Path
    layer: str
    dim: int
    ok: np.ndarray
    pooling: str | None
    whitened: bool


def feature_layers(model: Backbone) -> list[str]:
    """Layers ``write_features`` can write: ``fc`` then ``conv1``, ``conv2``, ..."""
    from deepcluster.evaluation.features import FC_LAYER

    return [FC_LAYER, *model.taps()]


def clustered_layer(model) -> str:
    """The true name of what a backbone's run clusters: ``fc`` (the last fully connected
    layer) or ``body`` (the pooled convolutional output: ``clustered: body``, and a ResNet's)."""
    return "fc" if model.separate_body else "body"


def feature_layer(model, asked: str | None, pca: bool) -> tuple[str, str]:
    """``(name, tap)``: the true name of the layer ``features`` writes (``asked``, default the
    clustered one) and the tap ``write_features`` reads; for ``fc`` / ``body`` the backbone's
    clustered output is switched to that layer. A ResNet has no fc: ``fc`` means its body.

    Raises:
        ConfigError: an unknown layer, or ``pca`` with a layer that is not the clustered one.
    """
    from deepcluster.config import ConfigError

    own = clustered_layer(model)
    resnet = hasattr(model, "stem_kind")
    name = asked or own
    if resnet and name == "fc":
        name = "body"
    known = (["body"] if resnet else ["fc", "body"]) + list(model.taps())
    if name not in known:
        raise ConfigError(f"unknown layer {name!r}; {model.arch} has {', '.join(known)}")
    if pca and name != own:
        raise ConfigError(f"--pca applies to the clustered layer only ({own}: the space k-means clustered in)")
    if name in ("fc", "body"):
        if not resnet:
            model.clustered = name
        return name, "fc"
    return name, name


def write_features(model: Backbone, config: Config, source: ImageSource, path: str | Path, layer: str = "fc",
                   pca: PCA | None = None, pool_dim: int | None = None, batch_size: int = 256, workers: int = 0,
                   device: torch.device | str = "cpu") -> FeatureFile:
    """Write the features of every image of ``source`` to ``path`` (``.npy``, float32), in
    bounded memory: rows go straight to a memory-mapped file.

    Args:
        model: the backbone (eval mode is set here).
        config: the run's configuration (centre view and normalisation).
        source: the images.
        path: the ``.npy`` file to write.
        layer: ``fc``, the features DeepCluster clusters (before PCA), or a conv layer, whose
            post-ReLU map is average-pooled to about ``pool_dim`` numbers as the linear probes do.
        pca: apply this PCA-whitening then L2 normalisation (``fc`` only): the space k-means
            clustered in.
        pool_dim: target size of a pooled conv layer (default 9,000, the paper's).
        batch_size, workers, device: the pass. Computed in float32, whatever the run's precision.

    Raises:
        ConfigError: an unknown layer, or ``pca`` with a conv layer.
    """
    from deepcluster.config import ConfigError
    from deepcluster.data import CenterView, Normalize
    from deepcluster.evaluation.features import FC_LAYER, TARGET_DIM, extract_features, probe_pooling

    known = feature_layers(model)
    if layer not in known:
        raise ConfigError(f"unknown layer {layer!r}; {model.arch} has {', '.join(known)}")
    if pca is not None and layer != FC_LAYER:
        raise ConfigError("PCA-whitening applies to the fc features only (the ones DeepCluster clusters)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    pools = {} if layer == FC_LAYER else {layer: probe_pooling(model, config.crop, pool_dim or TARGET_DIM)[layer]}
    scratch = path.parent / f".{path.stem}-{os.getpid()}"
    try:
        extracted = extract_features(model, source, CenterView(config.resize, config.crop),
                                     Normalize(config.mean, config.std), pools, include_fc=layer == FC_LAYER,
                                     batch_size=batch_size, workers=workers, device=device,
                                     storage_dir=scratch, prefix="")
        dim = _finish_feature_file(extracted, layer, scratch, path, pca)
    finally:
        for leftover in scratch.glob("*.npy") if scratch.is_dir() else []:
            leftover.unlink()
        if scratch.is_dir():
            scratch.rmdir()
    pooling = None if layer == FC_LAYER else pools[layer].describe()
    return FeatureFile(path, layer, dim, extracted.ok, pooling, pca is not None)


def _finish_feature_file(extracted, layer: str, scratch: Path, path: Path, pca: PCA | None) -> int:
    """Turn the memory-mapped features of ``layer`` in ``scratch`` into ``path``: moved there
    as they are, or projected by ``pca`` (in bounded chunks) into a new file; rows of
    unreadable images become zero. Releases ``extracted``'s arrays; returns the row width."""
    raw = extracted.layers[layer]
    if pca is None:
        del raw
        extracted.layers.clear()
        os.replace(scratch / f"{layer}.npy", path)
        written = np.load(path, mmap_mode="r+", allow_pickle=False)
        dim = int(written.shape[1])
        if not extracted.ok.all():  # rows of unreadable images hold the features of a black image
            written[~extracted.ok] = 0.0
            written.flush()
        del written
        return dim
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(raw), pca.n_components))
    step = 65536
    for start in range(0, len(raw), step):
        out[start:start + step] = pca.project(np.asarray(raw[start:start + step]))
    out[~extracted.ok] = 0.0
    out.flush()
    del out, raw
    extracted.layers.clear()
    return pca.n_components


__all__ = ["Assignment", "CHUNK_IMAGES", "ClusterModel", "FeatureFile", "assign_features", "assign_images",
           "clustered_layer", "feature_layer", "feature_layers", "load_cluster_model", "pca_from_checkpoint",
           "write_features"]
