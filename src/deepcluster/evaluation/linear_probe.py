"""Linear probes on frozen features: the paper's protocol, and a fast mode on cached features.

The reference (the authors' ``eval_linear.py``): a ``Linear(dim, n_classes)`` on the pooled
post-ReLU activation of one conv layer of the frozen backbone (eval mode, so BatchNorm
uses its running statistics), cross-entropy, SGD with learning rate 0.01, momentum 0.9,
batch 256, 90 epochs; the learning rate of step ``t`` is ``lr / sqrt(1 + lr * wd * t)``
(``wd`` the weight decay; the authors' run script uses ``wd = 1e-7``, which makes the
rate nearly constant). Training views: resize the shorter side, centre crop that size,
random crop, horizontal flip; validation: the centre view. The reported number is the
validation top-1 of the last epoch.

Two ways to run it here:

- ``train_linear_probe`` (*fast*): on features computed once from the centre view, so no
  augmentation; the same optimiser and schedule. Tensors in, numbers out.
- ``train_probes_augmented`` (*reference*): the backbone runs on augmented views at every
  step, as the authors do; every asked layer's probe trains from the same forward pass
  (the probes are independent, so this equals separate runs up to the data order).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from deepcluster.data import CenterView, ImageSource, Normalize
from deepcluster.data.transforms import center_crop, resize_shorter, to_uint8_tensor
from deepcluster.evaluation.features import PoolSpec, forward_layers
from deepcluster.models import Backbone


@dataclass(frozen=True)
class ProbeSettings:
    """Optimisation of a linear probe; defaults are the authors' ``eval_linear`` settings.

    Attributes:
        epochs: passes over the training split (90 in the paper).
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty; also sets the decay of the learning rate (see
            ``probe_learning_rate``). 1e-7 as in the authors' run script.
        batch_size: images per step.
        seed: seeds the probe's initialisation and the data order.
    """

    epochs: int = 90
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-7
    batch_size: int = 256
    seed: int = 31


@dataclass
class ProbeResult:
    """Outcome of one probe.

    Attributes:
        top1, top5: validation accuracy (%) after the last epoch: the reported numbers.
        best_top1: the best validation top-1 (%) over epochs: *selected on validation*,
            an optimistic number, shown only as such.
        best_epoch: 1-based epoch of ``best_top1``.
        train_top1: training accuracy (%) in the last epoch.
        history: per epoch: ``{"epoch", "loss", "train_top1", "top1", "top5", "lr"}``.
        seconds: wall time of the training.
    """

    top1: float
    top5: float
    best_top1: float
    best_epoch: int
    train_top1: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def probe_learning_rate(base_lr: float, weight_decay: float, step: int) -> float:
    """Learning rate of step ``step`` (0-based): ``base_lr / sqrt(1 + base_lr * weight_decay * step)``."""
    return base_lr / math.sqrt(1.0 + base_lr * weight_decay * step)


def top_k_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """Rows of ``logits`` ``(B, C)`` whose true class ``labels`` ``(B,)`` is among the ``k``
    highest scores (``k`` clipped to ``C``)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == labels[:, None]).any(dim=1).sum())


def new_probe(in_features: int, n_classes: int, seed: int) -> nn.Linear:
    """A ``Linear(in_features, n_classes)`` with PyTorch's default init, drawn from ``seed``
    without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_features, n_classes)


def new_optimizer(probe: nn.Linear, settings: ProbeSettings) -> torch.optim.SGD:
    return torch.optim.SGD(probe.parameters(), lr=settings.lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay)


def sgd_step(probe: nn.Linear, optimizer: torch.optim.SGD, inputs: torch.Tensor, labels: torch.Tensor,
             lr: float) -> tuple[float, int]:
    """One SGD step at learning rate ``lr``; returns (summed loss, correct top-1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = probe(inputs)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()) * len(labels), top_k_correct(logits.detach(), labels, 1)


@torch.no_grad()
def evaluate_probe(probe: nn.Linear, features: torch.Tensor, labels: torch.Tensor,
                   chunk_size: int = 4096) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of ``probe`` on ``(N, D)`` features and ``(N,)`` labels."""
    correct1 = correct5 = 0
    for start in range(0, len(labels), chunk_size):
        logits = probe(features[start:start + chunk_size].float())
        target = labels[start:start + chunk_size]
        correct1 += top_k_correct(logits, target, 1)
        correct5 += top_k_correct(logits, target, 5)
    n = max(len(labels), 1)
    return 100.0 * correct1 / n, 100.0 * correct5 / n


def _as_tensor(array: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(dtype)
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def _check_labels(labels: torch.Tensor, n_classes: int, what: str) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"{what} labels must lie in [0, {n_classes}), got [{int(labels.min())}, {int(labels.max())}]")


def train_linear_probe(train_features: np.ndarray | torch.Tensor, train_labels: np.ndarray | torch.Tensor,
                       val_features: np.ndarray | torch.Tensor, val_labels: np.ndarray | torch.Tensor,
                       n_classes: int, settings: ProbeSettings = ProbeSettings(),
                       log: Callable[[str], None] | None = None) -> ProbeResult:
    """Fast mode: a linear classifier on fixed features (no augmentation).

    Args:
        train_features: ``(N, D)`` float features of the training split.
        train_labels: ``(N,)`` integer classes in ``[0, n_classes)``.
        val_features: ``(M, D)`` features of the validation split.
        val_labels: ``(M,)`` classes.
        n_classes: number of outputs.
        settings: optimisation (the paper's by default).
        log: optional per-epoch progress callback.

    Returns:
        Last-epoch validation top-1/top-5, the best epoch (selected on validation) and the
        per-epoch history.
    """
    start = time.perf_counter()
    train_x = _as_tensor(train_features, torch.float32)
    train_y = _as_tensor(train_labels, torch.int64)
    val_x = _as_tensor(val_features, torch.float32)
    val_y = _as_tensor(val_labels, torch.int64)
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(train_x.shape)} and {tuple(val_x.shape)}")
    if len(train_x) != len(train_y) or len(val_x) != len(val_y) or len(train_x) == 0:
        raise ValueError("need as many labels as feature rows, and at least one training row")
    _check_labels(train_y, n_classes, "training")
    _check_labels(val_y, n_classes, "validation")
    probe = new_probe(train_x.shape[1], n_classes, settings.seed)
    optimizer = new_optimizer(probe, settings)
    order_rng = torch.Generator().manual_seed(settings.seed)
    history: list[dict] = []
    step = 0
    for epoch in range(settings.epochs):
        order = torch.randperm(len(train_y), generator=order_rng)
        total_loss, correct = 0.0, 0
        for first in range(0, len(order), settings.batch_size):
            batch = order[first:first + settings.batch_size]
            lr = probe_learning_rate(settings.lr, settings.weight_decay, step)
            # index_select copies the rows several times faster than train_x[batch].
            inputs = torch.index_select(train_x, 0, batch)
            loss, hits = sgd_step(probe, optimizer, inputs, train_y[batch], lr)
            total_loss += loss
            correct += hits
            step += 1
        top1, top5 = evaluate_probe(probe, val_x, val_y)
        history.append({"epoch": epoch + 1, "loss": total_loss / len(train_y),
                        "train_top1": 100.0 * correct / len(train_y), "top1": top1, "top5": top5, "lr": lr})
        if log is not None:
            log(f"    epoch {epoch + 1}/{settings.epochs}: loss {history[-1]['loss']:.4f} "
                f"train {history[-1]['train_top1']:.1f}% val top-1 {top1:.2f}%")
    return summarize(history, time.perf_counter() - start)


def summarize(history: list[dict], seconds: float) -> ProbeResult:
    """The reported numbers of a probe from its per-epoch history."""
    if not history:
        raise ValueError("the probe ran no epoch (epochs must be at least 1)")
    best = max(history, key=lambda record: record["top1"])
    last = history[-1]
    return ProbeResult(top1=last["top1"], top5=last["top5"], best_top1=best["top1"], best_epoch=best["epoch"],
                       train_top1=last["train_top1"], history=history, seconds=seconds)


@dataclass(frozen=True)
class RandomCropFlipView:
    """The reference probe's training view: resize the shorter side to ``resize``, centre crop
    ``resize x resize``, random crop ``crop x crop``, random horizontal flip."""

    resize: int
    crop: int

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        size = max(self.resize, self.crop)
        image = center_crop(resize_shorter(image, size), size)
        left, top = (int(rng.integers(0, size - self.crop + 1)) for _ in range(2))
        image = image.crop((left, top, left + self.crop, top + self.crop))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(image)


class LabelledViews(Dataset):
    """``(uint8 view, label)`` of every image; the random stream of item ``i`` in epoch ``e``
    is a pure function of ``(seed, e, i)``, whatever the number of workers."""

    def __init__(self, source: ImageSource, labels: np.ndarray, view: RandomCropFlipView | CenterView,
                 seed: int = 0, epoch: int = 0):
        self.source, self.labels, self.view = source, labels, view
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.source.load(index)
        if isinstance(self.view, RandomCropFlipView):
            tensor = self.view(image, np.random.default_rng((self.seed, self.epoch, index)))
        else:
            tensor = self.view(image)
        return tensor, int(self.labels[index])


def train_probes_augmented(model: Backbone, train_source: ImageSource, train_labels: np.ndarray,
                           val_source: ImageSource, val_labels: np.ndarray, n_classes: int,
                           pools: dict[str, PoolSpec], train_view: RandomCropFlipView, val_view: CenterView,
                           normalize: Normalize, settings: ProbeSettings = ProbeSettings(),
                           device: torch.device | str = "cpu", workers: int = 0,
                           log: Callable[[str], None] | None = None) -> dict[str, ProbeResult]:
    """Reference mode: probes on the frozen backbone's activations of augmented views.

    Args:
        model: the backbone; kept in eval mode, never updated.
        train_source, train_labels: training images and their ``(N,)`` classes.
        val_source, val_labels: validation images and their ``(M,)`` classes.
        n_classes: number of classes.
        pools: conv layer -> pooling (see ``probe_pooling``); one probe per entry.
        train_view: augmentation of the training images.
        val_view: centre view of the validation images.
        normalize: uint8 batch -> normalised float batch.
        settings: optimisation (the paper's by default).
        device: where the backbone and probes run.
        workers: data-loading processes.
        log: optional per-epoch progress callback.

    Returns:
        Layer name -> its ``ProbeResult``.
    """
    start = time.perf_counter()
    device = torch.device(device)
    model.eval()
    probes = {name: new_probe(spec.dim, n_classes, settings.seed + i).to(device)
              for i, (name, spec) in enumerate(pools.items())}
    optimizers = {name: new_optimizer(probe, settings) for name, probe in probes.items()}
    histories: dict[str, list[dict]] = {name: [] for name in pools}
    val_data = LabelledViews(val_source, val_labels, val_view)
    val_loader = DataLoader(val_data, batch_size=settings.batch_size, shuffle=False, num_workers=workers)
    step = 0
    for epoch in range(settings.epochs):
        train_data = LabelledViews(train_source, train_labels, train_view, settings.seed, epoch)
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(settings.seed + epoch))
        loader = DataLoader(torch.utils.data.Subset(train_data, order.tolist()), batch_size=settings.batch_size,
                            shuffle=False, num_workers=workers)
        losses, correct, step = _train_probes_epoch(model, probes, optimizers, loader, pools, normalize,
                                                    settings, device, step)
        lr = probe_learning_rate(settings.lr, settings.weight_decay, step - 1)  # that of the epoch's last step
        hits1, hits5 = _validate_probes(model, probes, val_loader, pools, normalize, device)
        n_train, n_val = max(len(train_data), 1), max(len(val_data), 1)
        for name in pools:
            histories[name].append({"epoch": epoch + 1, "loss": losses[name] / n_train,
                                    "train_top1": 100.0 * correct[name] / n_train,
                                    "top1": 100.0 * hits1[name] / n_val, "top5": 100.0 * hits5[name] / n_val,
                                    "lr": lr})
        if log is not None:
            summary = ", ".join(f"{name} {histories[name][-1]['top1']:.2f}%" for name in pools)
            log(f"    epoch {epoch + 1}/{settings.epochs}: val top-1 {summary}")
    seconds = time.perf_counter() - start
    return {name: summarize(history, seconds) for name, history in histories.items()}


def _train_probes_epoch(model: Backbone, probes: dict[str, nn.Linear], optimizers: dict[str, torch.optim.SGD],
                        loader: DataLoader, pools: dict[str, PoolSpec], normalize: Normalize,
                        settings: ProbeSettings, device: torch.device,
                        step: int) -> tuple[dict[str, float], dict[str, int], int]:
    """One epoch of every probe on the frozen backbone's activations of ``loader``'s batches,
    from global step ``step``.

    Returns:
        Summed loss and correct top-1 per layer, and the next step.
    """
    losses = {name: 0.0 for name in pools}
    correct = {name: 0 for name in pools}
    for images, labels in loader:
        labels = labels.to(device)
        with torch.no_grad():
            activations = forward_layers(model, normalize(images, device), pools)
        lr = probe_learning_rate(settings.lr, settings.weight_decay, step)
        for name, probe in probes.items():
            loss, hits = sgd_step(probe, optimizers[name], activations[name], labels, lr)
            losses[name] += loss
            correct[name] += hits
        step += 1
    return losses, correct, step


@torch.no_grad()
def _validate_probes(model: Backbone, probes: dict[str, nn.Linear], val_loader: DataLoader,
                     pools: dict[str, PoolSpec], normalize: Normalize,
                     device: torch.device) -> tuple[dict[str, int], dict[str, int]]:
    """Correct top-1 and top-5 of every probe over the validation batches."""
    hits1 = {name: 0 for name in pools}
    hits5 = {name: 0 for name in pools}
    for images, labels in val_loader:
        labels = labels.to(device)
        activations = forward_layers(model, normalize(images, device), pools)
        for name, probe in probes.items():
            logits = probe(activations[name])
            hits1[name] += top_k_correct(logits, labels, 1)
            hits5[name] += top_k_correct(logits, labels, 5)
    return hits1, hits5


__all__ = ["LabelledViews", "ProbeResult", "ProbeSettings", "RandomCropFlipView", "evaluate_probe",
           "probe_learning_rate", "summarize", "top_k_correct", "train_linear_probe", "train_probes_augmented"]
