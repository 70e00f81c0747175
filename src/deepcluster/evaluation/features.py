"""Per-layer activations of a frozen backbone, pooled to about 9,000 dimensions.

The paper's linear probe (DEEPCLUSTER.md section 3) reads the post-ReLU activation of every
convolution of AlexNet and average-pools it so that each layer gives a vector of about
9,000 numbers:

====== ============ =========== =============== ======
layer  map (224 px) pooling     grid            dims
====== ============ =========== =============== ======
conv1  96 x 55 x 55 6/6 pad 3   96 x 10 x 10    9600
conv2  256 x 27 x 27 4/4        256 x 6 x 6     9216
conv3  384 x 13 x 13 3/3 pad 1  384 x 5 x 5     9600
conv4  384 x 13 x 13 3/3 pad 1  384 x 5 x 5     9600
conv5  256 x 13 x 13 2/2        256 x 6 x 6     9216
====== ============ =========== =============== ======

``choose_pooling`` turns that table into a rule for any backbone and image size: among all
non-overlapping average poolings (kernel = stride = s, zero padding p <= s // 2, padded
zeros counted in the mean as in ``nn.AvgPool2d``'s default), take the one whose flattened
output is closest to the target (9,000); ties go to the smaller kernel, then the smaller
padding. A map already smaller than the target is kept whole (s = 1). For AlexNet at
224 px the rule gives exactly the table above (a unit test checks it).

The fully connected features that DeepCluster clusters (``forward_features``: the last
fully connected layer before its ReLU) are available as the layer named ``"fc"``; the
pooled convolutional output (the fully connected layers' input, what the online kNN's
``knn_body_top1`` reads) as ``"body"``, and the hidden fully connected layers after their
ReLU as ``"fc1"``, ``"fc2"``, ... (``head_layers``). None of these is pooled further.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from deepcluster.data import CenterView, ImageSource, Normalize
from deepcluster.features import PassSettings, feature_pass
from deepcluster.models import Backbone
from deepcluster.models.base import FC_LAYER

TARGET_DIM = 9000
BODY_LAYER = "body"


@dataclass(frozen=True)
class PoolSpec:
    """A non-overlapping average pooling of one ``(channels, height, width)`` map.

    Attributes:
        channels, height, width: shape of the map before pooling.
        kernel: kernel size and stride (square, non-overlapping).
        padding: zero padding on each side (counted in the average).
    """

    channels: int
    height: int
    width: int
    kernel: int
    padding: int

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, columns)`` of the pooled map."""
        return (_pooled_size(self.height, self.kernel, self.padding),
                _pooled_size(self.width, self.kernel, self.padding))

    @property
    def dim(self) -> int:
        """Length of the flattened pooled vector: ``channels * rows * columns``."""
        rows, columns = self.grid
        return self.channels * rows * columns

    def describe(self) -> str:
        """``"6/6 pad 3 -> 96x10x10 = 9600"``, for reports."""
        rows, columns = self.grid
        pooling = "none" if self.kernel == 1 else f"{self.kernel}/{self.kernel}"
        if self.padding:
            pooling += f" pad {self.padding}"
        return f"{pooling} -> {self.channels}x{rows}x{columns} = {self.dim}"

    def apply(self, activations: torch.Tensor) -> torch.Tensor:
        """Pool and flatten, ``(B, C, H, W) -> (B, dim)``."""
        if self.kernel > 1:
            activations = F.avg_pool2d(activations, self.kernel, stride=self.kernel, padding=self.padding)
        return torch.flatten(activations, 1)


def _pooled_size(size: int, kernel: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // kernel + 1


def choose_pooling(channels: int, height: int, width: int, target_dim: int = TARGET_DIM) -> PoolSpec:
    """The non-overlapping average pooling whose output size is closest to ``target_dim``.

    Args:
        channels, height, width: shape of the activation map.
        target_dim: wanted length of the flattened pooled vector (9,000 in the paper).

    Returns:
        The ``PoolSpec`` minimising ``|dim - target_dim|``; ties go to the smaller kernel,
        then the smaller padding (see the module docstring for the rule and the AlexNet
        table it reproduces).

    Raises:
        ValueError: a non-positive size.
    """
    if min(channels, height, width, target_dim) < 1:
        raise ValueError(f"sizes must be positive, got channels={channels}, height={height}, width={width}, "
                         f"target_dim={target_dim}")
    best: tuple[int, int, int] | None = None
    for kernel in range(1, max(height, width) + 1):
        for padding in range(0, kernel // 2 + 1):
            if kernel > min(height, width) + 2 * padding:
                continue
            spec = PoolSpec(channels, height, width, kernel, padding)
            key = (abs(spec.dim - target_dim), kernel, padding)
            if best is None or key < best:
                best = key
    assert best is not None  # kernel 1 always fits
    return PoolSpec(channels, height, width, best[1], best[2])


def probe_pooling(model: Backbone, image_size: int, target_dim: int = TARGET_DIM) -> dict[str, PoolSpec]:
    """The pooling of every tap of ``model`` for ``image_size`` px inputs, in tap order."""
    return {name: choose_pooling(*shape, target_dim=target_dim) for name, shape in model.tap_shapes(image_size).items()}


def _linear_layers(model: Backbone) -> list[nn.Linear]:
    classifier = model.classifier
    if not isinstance(classifier, nn.Sequential):  # a ResNet's Identity: no fully connected layers
        return []
    return [m for m in classifier.modules() if isinstance(m, nn.Linear)]


def head_layers(model: Backbone) -> list[str]:
    """The layers past the convolutions a backbone offers besides ``fc``: ``body`` (the pooled
    convolutional output) and ``fc1``, ``fc2``, ... (each hidden fully connected layer after
    its ReLU; a classifier of two ``Linear`` layers has ``fc1``). When the body is what is
    clustered (so ``fc`` is the body), the last ``Linear``'s output is offered too, as
    ``fc2`` for two layers."""
    count = len(_linear_layers(model))
    last = count if count and model.clustered == "body" else count - 1
    return [BODY_LAYER] + [f"fc{index}" for index in range(1, last + 1)]


def _head_outputs(model: Backbone, images: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """``body`` and ``fcN`` outputs (see ``head_layers``), from one pass through the body."""
    body = torch.flatten(model.pool(model.forward_body(images)), 1)
    outputs = {BODY_LAYER: body} if BODY_LAYER in names else {}
    hidden = [name for name in names if name != BODY_LAYER]
    if hidden:
        x, count, n_linear = body, 0, len(_linear_layers(model))
        for module in model.classifier:
            x = module(x)
            if isinstance(module, nn.Linear):
                count += 1
                if count == n_linear and f"fc{count}" in hidden:  # the last one: no ReLU follows
                    outputs[f"fc{count}"] = x
            elif isinstance(module, nn.ReLU) and f"fc{count}" in hidden:
                outputs[f"fc{count}"] = x.clone()
    return outputs


def forward_layers(model: Backbone, images: torch.Tensor, pools: dict[str, PoolSpec],
                   include_fc: bool = False, heads: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Pooled post-ReLU activations of the chosen taps (and the fc features), in one pass
    that stops after the last layer asked for (probing conv1 costs one convolution).

    Args:
        model: backbone, used as it is (call ``model.eval()`` for frozen BatchNorm).
        images: ``(B, 3, H, W)`` normalised images.
        pools: tap name (``"conv1"``, ...) -> its pooling.
        include_fc: also return ``forward_features`` as ``"fc"``, ``(B, feature_dim)``.
        heads: ``body`` and/or ``fcN`` (``head_layers``), unpooled (a second pass through the
            body when conv taps are asked too).

    Returns:
        Layer name -> ``(B, dim)`` tensor.

    Raises:
        KeyError: a layer name the backbone does not have.
    """
    outputs: dict[str, torch.Tensor] = {}
    if pools or include_fc:
        maps = model.forward_taps(images, [*pools, *([FC_LAYER] if include_fc else [])])
        outputs = {name: pools[name].apply(value) if name in pools else value for name, value in maps.items()}
    if heads:
        outputs.update(_head_outputs(model, images, list(heads)))
    return outputs


@dataclass
class ExtractedFeatures:
    """Features of every image of a source.

    Attributes:
        layers: layer name -> ``(N, dim)`` float32 array (a memory map when written to disk);
            rows of unreadable images are zero.
        ok: ``(N,)`` bool, False where the image could not be decoded.
        seconds: wall time of the pass.
    """

    layers: dict[str, np.ndarray]
    ok: np.ndarray
    seconds: float


def layer_dims(model: Backbone, pools: dict[str, PoolSpec], include_fc: bool,
               heads: tuple[str, ...] = ()) -> dict[str, int]:
    """Output width of each layer ``forward_layers`` returns."""
    dims = {name: spec.dim for name, spec in pools.items()}
    if include_fc:
        dims[FC_LAYER] = model.clustered_dim
    linears = _linear_layers(model)
    for name in heads:
        dims[name] = model.body_dim if name == BODY_LAYER else linears[int(name[2:]) - 1].out_features
    return dims


def _storage(dims: dict[str, int], n_images: int, storage_dir: str | Path | None, prefix: str) -> dict[str, np.ndarray]:
    """One zeroed ``(n_images, dim)`` float32 array per layer: in RAM, or ``.npy`` memory maps."""
    layers: dict[str, np.ndarray] = {}
    for name, dim in dims.items():
        if storage_dir is None:
            layers[name] = np.zeros((n_images, dim), dtype=np.float32)
        else:
            path = Path(storage_dir) / f"{prefix}{name}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            layers[name] = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_images, dim))
    return layers


@torch.no_grad()
def extract_features(model: Backbone, source: ImageSource, view: CenterView, normalize: Normalize,
                     pools: dict[str, PoolSpec], include_fc: bool = True, batch_size: int = 256,
                     workers: int = 0, device: torch.device | str = "cpu", channels_last: bool = False,
                     storage_dir: str | Path | None = None, prefix: str = "",
                     log: Callable[[str], None] | None = None, heads: tuple[str, ...] = ()) -> ExtractedFeatures:
    """One eval-mode feature pass (``deepcluster.features``) over ``source``, keeping every
    asked layer.

    Args:
        model: backbone; put in eval mode here (frozen BatchNorm statistics).
        source: the images.
        view: the deterministic centre view (resize then crop).
        normalize: uint8 batch -> normalised float batch.
        pools: conv layers to keep, with their pooling.
        include_fc: also keep the ``"fc"`` features.
        batch_size, workers: data loading.
        device: where the backbone runs.
        channels_last: memory layout of the input batch (same numbers).
        storage_dir: when given, each layer is written to ``<storage_dir>/<prefix><layer>.npy``
            as a memory map instead of being held in RAM (all conv layers of 50,000 CIFAR
            images take about 10 GB).
        prefix: file-name prefix inside ``storage_dir``.
        log: optional progress callback.
        heads: ``body`` and/or ``fcN`` layers to keep too (``head_layers``).

    Returns:
        The features of every image, in source order.
    """
    start = time.perf_counter()
    model.eval()
    device = torch.device(device)
    n_images = len(source)
    layers = _storage(layer_dims(model, pools, include_fc, heads), n_images, storage_dir, prefix)
    ok = np.zeros(n_images, dtype=bool)
    done, next_report = 0, 0.0

    def keep(rows: np.ndarray, outputs: dict[str, torch.Tensor], decoded: np.ndarray) -> None:
        nonlocal done, next_report
        for name, values in outputs.items():
            layers[name][rows] = values.float().cpu().numpy()
        ok[rows] = decoded
        done += len(rows)
        elapsed = time.perf_counter() - start
        if log is not None and elapsed >= next_report:
            log(f"  features {prefix.rstrip('_') or 'images'}: {done}/{n_images} ({elapsed:.0f}s)")
            next_report = elapsed + 30.0

    settings = PassSettings(view, normalize, batch_size, workers, device, channels_last)
    feature_pass(lambda batch: forward_layers(model, batch, pools, include_fc, heads), source, settings, keep,
                 label=f"features {prefix.rstrip('_')}".rstrip())
    for name, array in layers.items():
        if isinstance(array, np.memmap):
            array.flush()
    return ExtractedFeatures(layers, ok, time.perf_counter() - start)


__all__ = ["BODY_LAYER", "ExtractedFeatures", "FC_LAYER", "PoolSpec", "TARGET_DIM", "choose_pooling",
           "extract_features", "forward_layers", "head_layers", "layer_dims", "probe_pooling"]
