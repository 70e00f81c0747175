"""Signs that training has gone wrong: a non-finite loss or features, one cluster eating
the data set.

A non-finite value is fatal (``TrainingDiverged``): every later step would spread it, so
the run stops at once and its last checkpoint, written at the end of the last good epoch,
stays as it is. A dominant cluster is only a warning: DeepCluster's uniform sampler is
meant to pull the clustering out of it, and early epochs on hard data can pass through it.
"""

from __future__ import annotations

import math

import numpy as np

# More than this share of the images in one cluster is reported as degenerate (DeepCluster
# section 3.3, "trivial parametrization": most images falling into a few clusters).
DOMINANT_SHARE = 0.5


class TrainingDiverged(RuntimeError):
    """The loss or the features became NaN or infinite; the message says when."""


def _kept(epoch: int) -> str:
    return (f"the checkpoint of epoch {epoch} is kept" if epoch > 0
            else "no checkpoint had been written yet")


ADVICE = ("lower 'lr' (and 'head_lr') and start a new run in another --out folder; a resume with the same "
          "settings would repeat the same steps")


def check_loss(loss: float, epoch: int, step: int) -> None:
    """Raise ``TrainingDiverged`` when a batch's loss is NaN or infinite.

    Args:
        loss: the batch's mean cross-entropy.
        epoch: 0-based epoch index.
        step: 0-based batch index within the epoch.
    """
    if not math.isfinite(loss):
        raise TrainingDiverged(f"training loss became {loss} at epoch {epoch + 1}, batch {step + 1}; stopped, "
                               f"{_kept(epoch)}. To go on, {ADVICE}")


# Largest feature magnitude accepted: the PCA sums squares of features in float32 (max
# 3.4e38), so with up to 2**31 images a feature above sqrt(3.4e38 / 2**33) ~ 2e14 could make
# the covariance infinite while every feature is finite. A healthy network is far below.
FEATURE_LIMIT = 1e14


def check_features(features: np.ndarray, epoch: int, block: int = 65536) -> None:
    """Raise ``TrainingDiverged`` when the ``(N, D)`` features hold a NaN or an infinity, or
    a value above ``FEATURE_LIMIT`` (weights blown up by the previous epoch: the PCA's
    covariance would overflow, and k-means on them would be meaningless). Checked ``block``
    rows at a time, so the test needs little memory beside the features."""
    for start in range(0, len(features), block):
        part = features[start:start + block]
        if not np.isfinite(part).all():
            raise TrainingDiverged(f"the network's features became NaN or infinite at epoch {epoch + 1}; stopped, "
                                   f"{_kept(epoch)}. To go on, {ADVICE}")
        largest = float(np.abs(part).max()) if part.size else 0.0
        if largest > FEATURE_LIMIT:
            raise TrainingDiverged(f"the network's features became too large at epoch {epoch + 1} (|value| up to "
                                   f"{largest:.1e}: their PCA covariance would overflow); stopped, {_kept(epoch)}. "
                                   f"To go on, {ADVICE}")


def cluster_warnings(assignments: np.ndarray) -> list[str]:
    """Warnings about the balance of one clustering.

    Args:
        assignments: ``(N,)`` cluster id of every image, negative for unusable images.

    Returns:
        One sentence when a single cluster holds more than ``DOMINANT_SHARE`` of the usable
        images, else an empty list.
    """
    valid = assignments[assignments >= 0]
    if len(valid) == 0:
        return []
    counts = np.bincount(valid)
    largest = int(counts.argmax())
    share = counts[largest] / len(valid)
    if share <= DOMINANT_SHARE:
        return []
    return [f"cluster {largest} holds {100 * share:.1f}% of the images (more than half): the clustering is "
            f"degenerate; if this persists, check the data for near-duplicates, raise 'n_clusters' or lower 'lr'"]


__all__ = ["DOMINANT_SHARE", "TrainingDiverged", "check_features", "check_loss", "cluster_warnings"]
