"""THE feature pass: a frozen network over every image's centre view, batch by batch.

Training (the clustered features of each epoch and of the final clustering), the online
kNN, evaluation (per-layer features), the report (filter responses) and inference (assign,
features) all read images through :func:`feature_pass`, so they see the same views, the
same normalisation, precision and memory layout, and the same batches: a feature computed
by ``assign`` equals the one the run clustered, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from deepcluster import distributed, memory
from deepcluster.config import Config
from deepcluster.data import CenterView, FeatureDataset, ImageSource, Normalize
from deepcluster.models import Backbone
from deepcluster.progress import track


def loader_kwargs(workers: int, device: torch.device) -> dict[str, Any]:
    """``DataLoader`` settings shared by every pass over images (loading only, no numbers)."""
    kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kwargs["persistent_workers"] = False
        kwargs["prefetch_factor"] = 4
    return kwargs


def autocast(device: torch.device, bf16: bool):
    """bfloat16 autocast on ``device`` when ``bf16``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@dataclass(frozen=True)
class PassSettings:
    """How a pass reads and feeds images.

    Attributes:
        view: the deterministic centre view (resize, then crop).
        normalize: uint8 batch -> normalised float batch.
        batch_size, workers: data loading (the batch size also fixes the batches the
            network sees, so keep a run's own to reproduce its features exactly).
        device: where the network runs.
        channels_last: memory layout of the input batch (same maths).
        bf16: run the network under bfloat16 autocast.
    """

    view: CenterView
    normalize: Normalize
    batch_size: int
    workers: int = 0
    device: torch.device = torch.device("cpu")
    channels_last: bool = False
    bf16: bool = False

    @classmethod
    def of_run(cls, config: Config, device: torch.device) -> PassSettings:
        """The pass a run with ``config`` makes on ``device`` (its feature batch, workers,
        precision and layout)."""
        return cls(CenterView(config.resize, config.crop), Normalize(config.mean, config.std),
                   config.feature_batch_size, config.workers, torch.device(device), config.channels_last,
                   config.precision == "bf16")


@dataclass(frozen=True)
class Keep:
    """What a consumer of a pass (the online kNN) asks it to keep besides what it computes
    for itself: the raw clustered features of the ``(N,)`` bool ``rows`` and, with ``body``,
    their pooled conv body from the same forward."""

    rows: np.ndarray
    body: bool = False


@dataclass
class Kept:
    """What a pass kept for a ``Keep``: this process's share of the rows (all of them in one
    process), in ascending image order.

    Attributes:
        features: ``(n, clustered_dim)`` float32 raw features (zero rows for unreadable images).
        rows: ``(n,)`` their image indices.
        decoded: ``(n,)`` bool, the images that decoded.
        body: ``(n, body_dim)`` their pooled body, when asked for, else None.
    """

    features: np.ndarray
    rows: np.ndarray
    decoded: np.ndarray
    body: np.ndarray | None = None

    def select(self, rows: np.ndarray) -> Kept:
        """The kept images among the ``(N,)`` bool ``rows``."""
        mine = rows[self.rows]
        return Kept(self.features[mine], self.rows[mine], self.decoded[mine],
                    None if self.body is None else self.body[mine])


class Keeper:
    """Collects a ``Keep``'s rows from a pass that visits the images ``visited`` in that
    order, batch after batch (``add``), into a ``Kept`` (``result``)."""

    def __init__(self, keep: Keep, visited: np.ndarray, dim: int, body_dim: int) -> None:
        self.wanted = keep.rows[visited]
        self.rows = visited[self.wanted]
        self.features = np.zeros((len(self.rows), dim), dtype=np.float32)
        self.body = np.zeros((len(self.rows), body_dim), dtype=np.float32) if keep.body else None
        self.position, self.filled = 0, 0

    def add(self, out: Any) -> torch.Tensor:
        """The next batch of the visited images, as the network gave it: ``(B, dim)`` features
        or, with ``Keep.body``, ``(features, (B, body_dim) body)``; returns the features."""
        out, body = out if self.body is not None else (out, None)
        features = out.float().cpu().numpy()
        wanted = self.wanted[self.position:self.position + len(features)]
        count = int(wanted.sum())
        self.features[self.filled:self.filled + count] = features[wanted]
        if self.body is not None:
            self.body[self.filled:self.filled + count] = body.float().cpu().numpy()[wanted]
        self.position += len(features)
        self.filled += count
        return out

    def result(self, decoded: np.ndarray) -> Kept:
        """The kept rows in image order; ``decoded``: ``(N,)`` bool of every image."""
        order = np.argsort(self.rows, kind="stable")
        rows = self.rows[order]
        return Kept(self.features[order], rows, decoded[rows], None if self.body is None else self.body[order])


@torch.no_grad()
def feature_pass(forward: Callable[[torch.Tensor], Any], source: ImageSource, settings: PassSettings,
                 on_batch: Callable[[np.ndarray, Any, np.ndarray], None], indices: np.ndarray | None = None,
                 label: str = "features") -> None:
    """Run ``forward`` on the centre view of images of ``source``, in order, batch by batch.

    Args:
        forward: normalised ``(B, 3, H, W)`` batch -> what the caller keeps (a tensor, a dict
            of tensors); called without gradients, under autocast when ``settings.bf16``.
            Put the network in eval mode first.
        source: the images.
        settings: views, batches, device, precision.
        on_batch: receives ``(rows, outputs, decoded)`` for each batch: the ``(B,)`` source
            indices, ``forward``'s result, and the ``(B,)`` bool of images that decoded (the
            others were fed as black images: ignore their outputs).
        indices: the images to visit, in this order (default: all, in source order).
        label: the progress bar's name.
    """
    dataset = FeatureDataset(source, settings.view)
    if indices is not None:
        dataset = Subset(dataset, [int(index) for index in indices])
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False,
                        **loader_kwargs(settings.workers, settings.device))
    for images, rows, decoded in track(loader, len(dataset), label, unit="img", size=lambda batch: len(batch[0])):
        with autocast(settings.device, settings.bf16):
            outputs = forward(settings.normalize(images, settings.device, settings.channels_last))
        on_batch(rows.numpy(), outputs, decoded.numpy())
    images = outputs = None  # the last batch too, then what malloc holds of the pass goes back:
    memory.release_freed()  # its freed activations would not fit the next stage's blocks


def local_features(model: Backbone, source: ImageSource, config: Config, device: torch.device,
                   indices: np.ndarray | None = None, body: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Clustered features (``forward_clustered``) of this process's share of ``indices``
    (default: every image), as the run's feature pass computes them; nothing is gathered.

    Args:
        body: also return the pooled body the clustered features come from (same pass).

    Returns:
        ``(n, clustered_dim)`` float32 features (zero rows for unreadable images), their
        ``(n,)`` image indices (ascending when ``indices`` is), ``(n,)`` bool, the images
        that decoded, and with ``body`` the ``(n, body_dim)`` pooled body (else None).
    """
    model.eval()
    indices = distributed.shard(np.arange(len(source)) if indices is None else np.asarray(indices))
    features = np.zeros((len(indices), model.clustered_dim), dtype=np.float32)
    pooled = np.zeros((len(indices), model.body_dim), dtype=np.float32) if body else None
    decoded = np.zeros(len(indices), dtype=bool)
    position = 0

    def keep(rows: np.ndarray, out: Any, ok: np.ndarray) -> None:
        nonlocal position
        if body:
            out, body_out = out
            pooled[position:position + len(rows)] = body_out.float().cpu().numpy()
        features[position:position + len(rows)] = out.float().cpu().numpy()
        decoded[position:position + len(rows)] = ok
        position += len(rows)

    forward = model.forward_clustered_and_body if body else model.forward_clustered
    feature_pass(forward, source, PassSettings.of_run(config, device), keep, indices)
    return features, indices, decoded, pooled


@torch.no_grad()
def batchnorm_statistics_of(model: Backbone, source: ImageSource, settings: PassSettings) -> Backbone:
    """Replace the running statistics of ``model``'s BatchNorm layers by those of ``source``'s
    centre views: one training-mode pass without gradients, each layer averaging its batch
    statistics over the pass (no momentum). The weights are untouched; ``model`` is returned
    in eval mode.

    Any training, even one that learns nothing, leaves the data's statistics in a network; a
    random network measured with the statistics it was initialised with (mean 0, variance 1)
    is a weaker baseline than that (on CIFAR-10, six kNN points weaker: docs/findings.md).
    """
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a plain average over the pass
    model.train()
    try:
        feature_pass(model.forward_clustered, source, settings, lambda *_: None, label="batchnorm statistics")
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()
    return model


def compute_features(model: Backbone, source: ImageSource, config: Config, device: torch.device,
                     body: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Clustered features of every image (each process passes its shard; every process gets
    all rows: for the validation images, not for a training set).

    Args:
        body: also return the pooled body (``Backbone.forward_clustered_and_body``).

    Returns:
        ``(N, clustered_dim)`` float32 features (zero rows for unreadable images), an ``(N,)``
        bool mask of the images that decoded, and with ``body`` the ``(N, body_dim)`` pooled
        body (else None).
    """
    features, indices, decoded, pooled = local_features(model, source, config, device, body=body)
    return (distributed.gather_in_order(features, indices, len(source)),
            distributed.gather_in_order(decoded.astype(np.uint8), indices, len(source)).astype(bool),
            None if pooled is None else distributed.gather_in_order(pooled, indices, len(source)))


__all__ = ["Keep", "Kept", "Keeper", "PassSettings", "autocast", "batchnorm_statistics_of", "compute_features", "feature_pass", "loader_kwargs",
           "local_features"]
