"""An epoch's log record, for every method: the numbers of its clustering (the planner's
part, :func:`clustering_record`), then the monitor's and the training pass's
(:func:`epoch_record`); and the numbers of the final clustering."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from deepcluster import collapse, memory
from deepcluster.clustering import cluster_sizes, nmi
from deepcluster.health import cluster_warnings
from deepcluster.memory import PEAK_KEYS
from deepcluster.run_files import json_record

if TYPE_CHECKING:
    from deepcluster.methods import Plan
    from deepcluster.partition import Partition


def clustering_record(epoch: int, assignments: np.ndarray, n_clusters: int, previous: np.ndarray | None,
                 times: tuple[float, float, float], n_split: int, objective: float | None,
                 spherical: dict[str, Any] | None = None) -> dict[str, Any]:
    """Epoch ``epoch``'s (0-based) numbers of its clustering, in the order ``log.jsonl``
    shows them.

    Args:
        assignments: ``(N,)`` the epoch's pseudo-labels (head 0's for v2).
        n_clusters: the clusters they may use.
        previous: the labels a fresh clustering replaced (``nmi_prev``), or None.
        times: seconds in the feature pass, the PCA and the k-means.
        n_split: empty clusters re-seeded.
        objective: v1's k-means objective (a squared distance), or None.
        spherical: v2's per-head numbers (``spherical_objective``, ``n_empty``), or None.
    """
    time_features, time_pca, time_kmeans = times
    sizes = cluster_sizes(assignments, n_clusters)
    return {"epoch": epoch + 1,  # counted from 1 wherever a person reads it
            "time_features": time_features, "time_pca": time_pca, "time_kmeans": time_kmeans, "n_split": n_split,
            "time_clustering": time_pca + time_kmeans, "clustering_objective": objective, **(spherical or {}),
            "n_nonempty": sizes.n_nonempty, "largest_cluster_share": sizes.largest_share,
            # Stability: only meaningful when a new clustering replaced the previous one.
            "nmi_prev": None if previous is None else nmi(previous, assignments),
            "warnings": cluster_warnings(assignments)}


def epoch_record(plan: Plan, scores: dict[str, Any], trained: Any, seconds: float, n_skipped: int,
                 heads: bool = False, processes: dict[str, int] | None = None) -> dict[str, Any]:
    """An epoch's whole log record, as plain values: the plan's numbers (its
    :func:`clustering_record`), the monitor's ``scores``, then the training pass's
    (``trained``: ``train.Trained``, ``seconds`` long; with ``heads`` each head's loss and the
    last rate), the collapse indicators, the images, ``processes`` (several only) and the
    peak memory of the stages noted since the last record (``memory.take``)."""
    per_head = {"train_loss_per_head": list(trained.head_losses), "lr": trained.lr} if heads else {}
    return json_record({**plan.record, **scores, "time_training": seconds, "train_loss": trained.loss, **per_head,
                        **collapse.indicators(plan, trained.loss), "train_images_per_s": trained.seen / max(seconds, 1e-9),
                        "n_images": int((plan.assignments >= 0).sum()), "n_skipped": n_skipped, **(processes or {})}) | memory.take()


def final_record(epochs: int, final: Partition, last: np.ndarray | None, time_features: float,
                 spherical: dict[str, Any] | None = None) -> dict[str, Any]:
    """The numbers of the trained network's clustering ``final`` after ``epochs`` epochs
    (``final.json``); ``last``: the last epoch's assignments (``nmi_last_epoch``), or None;
    ``spherical``: as for :func:`clustering_record`."""
    sizes = cluster_sizes(final.assignments, final.n_clusters)
    return {"epoch": epochs, "clustering_objective": final.objective, **(spherical or {}),
            "n_clusters": final.n_clusters, "n_nonempty": sizes.n_nonempty,
            "largest_cluster_share": sizes.largest_share,
            "nmi_last_epoch": None if last is None else nmi(last, final.assignments),
            "time_features": time_features, "time_clustering": final.time_pca + final.time_kmeans}


# The keys of an epoch record that depend on the machine's state, not on the run's settings
# and data: a resumed run equals an uninterrupted one in every other key.
MACHINE_KEYS = ("time_features", "time_pca", "time_kmeans", "time_clustering", "time_training", "time_monitor",
                "train_images_per_s", "time_run", *PEAK_KEYS)

__all__ = ["MACHINE_KEYS", "clustering_record", "epoch_record", "final_record"]
