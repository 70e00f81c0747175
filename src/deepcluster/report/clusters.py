"""What the clusters group: sizes, majority classes, purity, and bounded samples to show.

Pure numpy, no images: the page builder decides which clusters and images to draw from
these summaries, so a run of 50,000 images and k = 10,000 still gives a page of a few MB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClusterSummary:
    """One cluster of an assignment.

    Attributes:
        cluster: its id.
        size: images assigned to it.
        majority: most frequent true class among them (``None`` without labels).
        purity: share of its images in that class, in [0, 1] (``None`` without labels).
    """

    cluster: int
    size: int
    majority: int | None = None
    purity: float | None = None


def summarize_clusters(assignments: np.ndarray, labels: np.ndarray | None = None) -> list[ClusterSummary]:
    """Summaries of every non-empty cluster, largest first (ties: smaller id first).

    Args:
        assignments: ``(N,)`` cluster id of each image; negative ids (unreadable) ignored.
        labels: ``(N,)`` true class of each image, or ``None``.
    """
    assignments = np.asarray(assignments)
    usable = assignments >= 0
    ids = assignments[usable].astype(np.int64)
    if ids.size == 0:
        return []
    sizes = np.bincount(ids)
    clusters = np.flatnonzero(sizes)
    if labels is None:
        majority = purity = None
    else:
        classes = np.asarray(labels)[usable].astype(np.int64)
        n_classes = int(classes.max()) + 1
        # Sparse-friendly counting: one bincount over (cluster, class) pairs.
        pairs = np.bincount(ids * n_classes + classes, minlength=len(sizes) * n_classes).reshape(len(sizes), n_classes)
        majority = pairs.argmax(axis=1)
        purity = pairs.max(axis=1) / np.maximum(sizes, 1)
    order = clusters[np.lexsort((clusters, -sizes[clusters]))]
    return [ClusterSummary(int(c), int(sizes[c]),
                           None if majority is None else int(majority[c]),
                           None if purity is None else float(purity[c])) for c in order]


def choose_clusters(summaries: list[ClusterSummary], max_clusters: int,
                    min_size_for_purity: int = 1) -> list[ClusterSummary]:
    """At most ``max_clusters`` clusters to show: the largest, and with labels also the purest.

    Without labels: the ``max_clusters`` largest. With labels: half the places go to the
    largest, the rest to the purest among clusters of at least ``min_size_for_purity``
    images (a cluster of one image is trivially pure), without repeats, then filled up
    with the next largest. Returned largest first.
    """
    if max_clusters <= 0 or not summaries:
        return []
    by_size = sorted(summaries, key=lambda s: (-s.size, s.cluster))
    if summaries[0].purity is None or len(summaries) <= max_clusters:
        return by_size[:max_clusters]
    chosen: dict[int, ClusterSummary] = {s.cluster: s for s in by_size[:(max_clusters + 1) // 2]}
    eligible = [s for s in summaries if s.size >= min_size_for_purity]
    for summary in sorted(eligible, key=lambda s: (-(s.purity or 0.0), -s.size, s.cluster)):
        if len(chosen) >= max_clusters:
            break
        chosen.setdefault(summary.cluster, summary)
    for summary in by_size:
        if len(chosen) >= max_clusters:
            break
        chosen.setdefault(summary.cluster, summary)
    return sorted(chosen.values(), key=lambda s: (-s.size, s.cluster))


def sample_members(assignments: np.ndarray, clusters: list[int], per_cluster: int,
                   seed: int = 0) -> dict[int, np.ndarray]:
    """Up to ``per_cluster`` image indices of each cluster, drawn uniformly without
    replacement (seeded), in increasing index order.

    Returns:
        cluster id -> ``(n,)`` int64 image indices, ``n = min(per_cluster, size)``.
    """
    assignments = np.asarray(assignments)
    rng = np.random.default_rng(seed)
    wanted = np.asarray(sorted(set(int(c) for c in clusters)), dtype=np.int64)
    members = np.flatnonzero(np.isin(assignments, wanted))
    order = members[np.argsort(assignments[members], kind="stable")]
    groups = dict(zip(*_split_by(order, assignments[order])))
    out: dict[int, np.ndarray] = {}
    for cluster in clusters:
        images = groups.get(int(cluster), np.zeros(0, dtype=np.int64))
        if len(images) > per_cluster:
            images = np.sort(rng.choice(images, per_cluster, replace=False))
        out[int(cluster)] = images.astype(np.int64)
    return out


def _split_by(order: np.ndarray, keys: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
    if len(order) == 0:
        return [], []
    unique, starts = np.unique(keys, return_index=True)
    return [int(u) for u in unique], np.split(order, starts[1:])


def size_statistics(summaries: list[ClusterSummary], n_clusters: int) -> dict[str, float]:
    """Headline numbers of the size distribution (``n_clusters`` counts empty ones too)."""
    sizes = np.array([s.size for s in summaries], dtype=np.float64)
    total = sizes.sum() if sizes.size else 0.0
    stats = {"clusters": float(n_clusters), "nonempty": float(len(sizes)), "images": float(total)}
    if sizes.size:
        stats.update(largest=float(sizes.max()), smallest=float(sizes.min()), median=float(np.median(sizes)),
                     largest_share=float(sizes.max() / total))
    return stats


__all__ = ["ClusterSummary", "choose_clusters", "sample_members", "size_statistics", "summarize_clusters"]
