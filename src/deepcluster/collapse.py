"""Collapse: the features fold onto one direction and training goes on learning nothing.

DeepCluster can fall into a trivial solution that its loss does not show: every image maps
to nearly the same point, the clustering of such points is arbitrary, the network cannot
do better than chance on arbitrary labels (the loss sits near ``ln k``), and the run ends
normally. Small folders with many clusters per image are where it happens most (v2 with
300 prototypes per head on 3,000 CIFAR images). This module measures it on what every
epoch already holds and says so once.

Indicators (added to every epoch record, ``log.jsonl``), from the points the epoch clustered:

- ``effective_rank``: exp of the entropy of the normalised singular values (Roy and
  Vetterli 2007): the number of directions the points really span, 1 for points on one
  line, up to their width for points spread evenly. v1: the PCA's spectrum of the
  epoch's features (centred, before whitening: the whitened points span every direction
  equally by construction). v2: the memory bank's unit embeddings of head 0's crop, not
  centred, as the spherical k-means sees them, at most ``SAMPLE_ROWS`` rows spread evenly
  over the images, read from the bank after training (what the epoch's training wrote into
  it, as the loss is). With several processes each holds its share of the bank: each
  gives the sampled rows it holds and every process gets them all (at most
  ``SAMPLE_ROWS`` rows travel), so the figures are those of one process.
- ``mean_cosine``: v2 only: the mean cosine of the unit embeddings with their common mean
  direction (the length of their mean): near 0 for spread points, 1 when they all point
  one way. The spherical k-means' own "cosine" is no substitute: with about as many
  clusters as images every image is its own centroid and it reads 1 whatever the points.
- ``loss_ratio``: the epoch's training loss over the mean of ``ln k`` over the heads: a
  network that predicts every cluster equally likely reads 1.

``collapse`` is null, or a short reason when the epoch is collapsing: the points fold
(``effective_rank`` at most ``RANK_LIMIT``, or ``mean_cosine`` at least ``COSINE_LIMIT``)
and the network predicts the clusters no better than chance (``loss_ratio`` at least
``LOSS_FLOOR``). Both are needed: a healthy v2 run on a few images can narrow its
embeddings to a mean cosine of 0.98 while its loss falls well below ``ln k``, and a loss
at ``ln k`` alone is every run's first epoch. ``largest_cluster_share``, logged by every
method, is quoted in the reason. The computation takes no random numbers (the sample is
evenly spaced), so a run's streams are untouched; it costs an SVD of at most
``SAMPLE_ROWS`` rows.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from deepcluster.methods import Plan

SAMPLE_ROWS = 2000
RANK_LIMIT = 2.0  # directions: points spanning this few are on (nearly) a line
COSINE_LIMIT = 0.97  # mean cosine with the common direction: the embeddings all point one way
LOSS_FLOOR = 0.95  # training loss over ln k: not below it, the network predicts the clusters no better than chance


def effective_rank(singular_values: np.ndarray) -> float:
    """exp of the entropy of ``singular_values / their sum`` (1 to their number)."""
    values = np.asarray(singular_values, dtype=np.float64)
    values = values[values > 0]
    if values.size == 0:
        return 0.0
    p = values / values.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def sample_indices(usable: np.ndarray, n_rows: int = SAMPLE_ROWS) -> np.ndarray:
    """At most ``n_rows`` of the indices where ``usable`` (bool) holds, evenly spaced and
    ascending: no random numbers."""
    rows = np.flatnonzero(usable)
    if len(rows) > n_rows:
        rows = rows[np.linspace(0, len(rows) - 1, n_rows).round().astype(np.int64)]
    return rows


def sample_rows(points: np.ndarray, usable: np.ndarray | None = None, n_rows: int = SAMPLE_ROWS) -> np.ndarray:
    """At most ``n_rows`` rows of ``points`` (those ``usable``), evenly spaced: no random numbers."""
    rows = sample_indices(usable if usable is not None else np.ones(len(points), dtype=bool), n_rows)
    return np.asarray(points[rows], dtype=np.float64)


def embedding_indicators(points: np.ndarray) -> dict[str, float | None]:
    """``effective_rank`` and ``mean_cosine`` of ``(n, d)`` rows (normalised here; not centred)."""
    if len(points) == 0:
        return {"effective_rank": None, "mean_cosine": None}
    norms = np.linalg.norm(points, axis=1, keepdims=True)
    unit = points / np.maximum(norms, 1e-12)
    return {"effective_rank": effective_rank(np.linalg.svd(unit, compute_uv=False)),
            "mean_cosine": float(np.linalg.norm(unit.mean(axis=0)))}


def loss_ratio(train_loss: float | None, targets: np.ndarray | None) -> float | None:
    """``train_loss`` over the mean ``ln k`` of the heads (k: each head's largest label + 1)."""
    if train_loss is None or targets is None or not math.isfinite(train_loss):
        return None
    logs = [math.log(int(head.max()) + 1) for head in np.atleast_2d(targets) if head.size and head.max() > 0]
    return float(train_loss / np.mean(logs)) if logs else None


def indicators(plan: Plan, train_loss: float | None) -> dict[str, Any]:
    """The epoch's indicators and verdict (``effective_rank``, ``mean_cosine``, ``loss_ratio``,
    ``collapse``), from its plan and training loss."""
    found: dict[str, Any] = {"effective_rank": None, "mean_cosine": None}
    width = None
    if plan.pca is not None:  # v1: the features' spectrum before whitening
        width = len(plan.pca.eigenvalues)
        found["effective_rank"] = effective_rank(np.sqrt(np.maximum(np.asarray(plan.pca.eigenvalues), 0.0)))
    elif plan.bank_rows is not None:  # v2: the bank's unit embeddings, gathered from every process's share
        points = plan.bank_rows(sample_indices(plan.assignments >= 0))
        width = points.shape[1]
        found.update(embedding_indicators(points))
    elif plan.points is not None:  # points of no PCA: their unit rows
        width = plan.points.shape[1]
        found.update(embedding_indicators(sample_rows(plan.points, plan.assignments >= 0)))
    found["loss_ratio"] = loss_ratio(train_loss, plan.targets)
    found["collapse"] = verdict(found, plan.record.get("largest_cluster_share"), width)
    return found


def verdict(found: dict[str, Any], largest_share: float | None = None, width: int | None = None) -> str | None:
    """A short reason when ``found`` (as :func:`indicators` gives) says collapsing, else None;
    ``width``: the directions the points could span."""
    rank, cosine, ratio = found.get("effective_rank"), found.get("mean_cosine"), found.get("loss_ratio")
    folded = (rank is not None and rank <= RANK_LIMIT) or (cosine is not None and cosine >= COSINE_LIMIT)
    if not folded or ratio is None or ratio < LOSS_FLOOR:
        return None
    parts = [f"{rank:.1f} effective directions{f' of {width}' if width else ''}" if rank is not None else None,
             f"mean cosine {cosine:.2f} to their common direction" if cosine is not None else None,
             f"loss {ratio:.2f} ln k",
             f"largest cluster {100 * largest_share:.0f}% of the images" if largest_share is not None else None]
    return ", ".join(part for part in parts if part)


def since(records: list[dict]) -> int | None:
    """The epoch (from 1) since which the last of ``records`` has been collapsing, or None."""
    start = None
    for record in reversed(records):
        if not record.get("collapse"):
            break
        start = record.get("epoch")
    return start


def advice(config: Any) -> str:
    """What to try against collapse, for the run's settings (a third of its clusters)."""
    from deepcluster.methods.registry import METHODS

    if METHODS[config.method].assigns_by_prototypes:
        fewer = f"fewer prototypes (e.g. --prototypes {','.join(str(max(2, k // 3)) for k in config.prototypes)})"
    else:
        fewer = f"fewer clusters (e.g. --n_clusters {max(2, config.n_clusters // 3)})"
    return f"try {fewer}, a lower --lr, or more images"


def warning_line(records: list[dict], config: Any, stopping: bool = False) -> str | None:
    """The one terminal line when the last of ``records`` starts a collapse (the epoch before
    it did not collapse), or, with ``stopping``, when the run stops on it; else None."""
    if not records or not records[-1].get("collapse"):
        return None
    first = since(records)
    if first != records[-1].get("epoch") and not stopping:
        return None  # already said
    end = ("; stopped after this epoch (stop_on_collapse): --resume --stop_on_collapse false goes on"
           if stopping else "")
    return (f"deepcluster: warning: collapsing since epoch {first}: the features fold onto one direction "
            f"({records[-1]['collapse']}); {advice(config)}{end}")


def announce(records: list[dict], config: Any, say: Callable[[str], None]) -> bool:
    """Say :func:`warning_line` of the run's ``records`` (once per collapse); True when the run
    should stop there (``stop_on_collapse`` and the last epoch collapsing)."""
    stopping = bool(config.stop_on_collapse and records and records[-1].get("collapse"))
    line = warning_line(records, config, stopping)
    if line:
        say(line)
    return stopping


def report_line(records: list[dict]) -> str | None:
    """The report's warning about collapse, or None."""
    collapsed = [record for record in records if record.get("collapse")]
    if not collapsed:
        return None
    first, last = collapsed[0], records[-1]
    still = "and still is at the last epoch" if last.get("collapse") else f"but not at the last epoch ({last['epoch']})"
    return (f"collapsing from epoch {first.get('epoch')} ({first['collapse']}) {still}: the features fold onto "
            f"one direction and the clusters mean nothing")


__all__ = ["COSINE_LIMIT", "LOSS_FLOOR", "RANK_LIMIT", "SAMPLE_ROWS", "advice", "announce", "effective_rank",
           "embedding_indicators", "indicators", "loss_ratio", "report_line", "sample_indices", "sample_rows", "since",
           "verdict", "warning_line"]
