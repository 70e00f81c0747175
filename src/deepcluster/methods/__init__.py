"""The methods: what each epoch trains on, and how.

A method (``Method``; the registry is ``methods.registry.METHODS``) builds the network, its
head and optimiser, plans every epoch (the plan: a pseudo-label of every image in every head,
what the checkpoint keeps of the clustering, the numbers to log) and makes the epoch's
batches; the one training loop (``deepcluster.train``) does the rest. v1 (``methods.v1``):
feature pass -> PCA-whitening -> L2 -> k-means -> a new head. v2 (``methods.v2``): spherical
k-means of last epoch's memory bank, per head -> prototypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from deepcluster.losses import per_head_losses

if TYPE_CHECKING:
    from deepcluster.clustering.pca import PCA
    from deepcluster.features import Kept

# The independent random streams of a run, each seeded by (run seed, epoch, stream).
STREAM_CLUSTERING, STREAM_SAMPLER, STREAM_FEATURE_ORDER, STREAM_SCORES, STREAM_HEAD_SAMPLE, STREAM_BANK_VIEWS = range(6)


@dataclass
class Plan:
    """What an epoch trains on, and what the monitor scores.

    Attributes:
        assignments: ``(N,)`` int64 pseudo-label of every image (-1: not used); for v2, those
            of head 0 (what the run folder saves and the log scores).
        record: the epoch's numbers so far (clustering, seconds per stage), in the order
            ``log.jsonl`` shows them.
        targets: ``(n_heads, N)`` int64 assignments of every head (-1: not used); v1 has one.
        fresh: a new clustering was made (v1 keeps the last one between ``reassign_every`` epochs).
        points: ``(N, d)`` the clustered points, for the k = number of classes accuracy
            (None when no process holds them all).
        pca: the PCA that made ``points`` (its whitening is undone before that accuracy).
        kept: what the feature pass kept for the monitor (``features.Keep``), or None.
        bank_rows: v2: ``(image indices) -> (n, d)`` the memory bank's embeddings of those
            images as it holds them when called, on every process (the collapse indicators).
    """

    assignments: np.ndarray
    record: dict[str, Any]
    targets: np.ndarray | None = None
    fresh: bool = True
    points: np.ndarray | None = None
    pca: PCA | None = None
    kept: Kept | None = None
    bank_rows: Callable[[np.ndarray], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.targets is None:
            self.targets = self.assignments[None]


@dataclass(frozen=True)
class Method:
    """One DeepCluster method, as the training loop uses it.

    Attributes:
        name: ``v1`` or ``v2`` (the setting ``method``).
        build: ``(config, device) -> (backbone, head, optimiser)``, fresh and seeded.
        planner: ``(config, device, source, head) -> planner``: the run's planner (``plan``,
            ``final_clustering``, ``checkpoint_entries``, ``load_state``, ``bank``).
        loader: ``(source, plan, config, epoch, device) -> DataLoader`` of the epoch.
        network: ``(backbone, head) -> module``: crops -> (embeddings or None, scores per head).
        temperature: ``config -> T`` of the loss (v1: 1).
        head_group: ``(head, config) -> parameter group or None``: optimised with the body
            for one epoch, at a rate of its own (v1's momentum-free head SGD).
        size_problem: ``(config, n_images) -> one line or None``: what the data cannot satisfy
            of the settings (the run refuses it with that line).
        global_batch: ``(config, processes) -> images per step over all processes``.
        sync_batchnorm: what ``sync_batchnorm: auto`` means for the method.
        describe: ``config -> the clusters the run makes, in a few words``.
        notes: ``(config, n_images) -> warnings before the first epoch``.
        logs_heads: the log has each head's loss and the last rate.
        clustering_text: ``config -> how the run clusters`` (a report's summary).
        n_clusters: ``config -> the clusters the settings ask for`` (0: the method finds them).
        cluster_settings: ``config -> {"n_clusters": .., "prototypes": ..}``, the other None.
        assigns_by_prototypes: ``assign`` places an image by head 0's prototypes (not PCA + centroids).
        loss: ``(scores per head, (n_heads, B) targets, T) -> (n_heads,)`` losses.
    """

    name: str
    build: Callable[..., tuple]
    planner: Callable[..., Any]
    loader: Callable[..., Any]
    network: Callable[..., Any]
    temperature: Callable[[Any], float]
    head_group: Callable[..., dict | None]
    size_problem: Callable[[Any, int], str | None]
    global_batch: Callable[[Any, int], int]
    sync_batchnorm: bool
    describe: Callable[[Any], str]
    notes: Callable[[Any, int], list[str]]
    logs_heads: bool
    clustering_text: Callable[[Any], str]
    n_clusters: Callable[[Any], int]
    cluster_settings: Callable[[Any], dict]
    assigns_by_prototypes: bool
    loss: Callable[..., Any] = per_head_losses


def derived_seed(seed: int, epoch: int, stream: int, *more: int) -> int:
    """A 32-bit seed that is a pure function of (run seed, epoch, stream, ``more``: e.g. v2's
    head)."""
    return int(np.random.SeedSequence([seed, epoch, stream, *more]).generate_state(1)[0])


__all__ = ["Method", "Plan", "STREAM_BANK_VIEWS", "STREAM_CLUSTERING", "STREAM_FEATURE_ORDER", "STREAM_HEAD_SAMPLE",
           "STREAM_SAMPLER", "STREAM_SCORES", "derived_seed"]
