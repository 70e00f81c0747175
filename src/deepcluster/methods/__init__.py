"""One planner per method: what to train on in an epoch.

A planner turns the network's current state into the epoch's plan: the pseudo-label of
every image, what the checkpoint keeps of the clustering, and the numbers to log. v1
(``methods.v1``): feature pass -> PCA-whitening -> L2 -> k-means -> a new head. v2
(``methods.v2``): spherical k-means of last epoch's memory bank, per head -> prototypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# The independent random streams of a run, each seeded by (run seed, epoch, stream).
STREAM_CLUSTERING, STREAM_SAMPLER, STREAM_FEATURE_ORDER, STREAM_SCORES, STREAM_HEAD_SAMPLE, STREAM_BANK_VIEWS = range(6)


@dataclass
class Plan:
    """What an epoch trains on.

    Attributes:
        assignments: ``(N,)`` int64 pseudo-label of every image (-1: not used); for v2, those
            of head 0 (what the run folder saves and the log scores).
        record: the epoch's numbers so far (clustering, its scores, seconds per stage), in
            the order ``log.jsonl`` shows them.
        targets: v2 only, ``(n_heads, N)`` int64 assignments of every head (-1: not used).
    """

    assignments: np.ndarray
    record: dict[str, Any]
    targets: np.ndarray | None = None


def derived_seed(seed: int, epoch: int, stream: int) -> int:
    """A 32-bit seed that is a pure function of (run seed, epoch, stream)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


__all__ = ["Plan", "STREAM_BANK_VIEWS", "STREAM_CLUSTERING", "STREAM_FEATURE_ORDER", "STREAM_HEAD_SAMPLE", "STREAM_SAMPLER", "STREAM_SCORES",
           "derived_seed"]
