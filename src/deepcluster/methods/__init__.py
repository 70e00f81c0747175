"""One planner per method: what to train on in an epoch.

A planner turns the network's current state into the epoch's plan: the pseudo-label of
every image, what the checkpoint keeps of the clustering, and the numbers to log. v1
(``methods.v1``): feature pass -> PCA-whitening -> L2 -> k-means -> a new head.
"""

from __future__ import annotations

import numpy as np

# The independent random streams of a run, each seeded by (run seed, epoch, stream).
STREAM_CLUSTERING, STREAM_SAMPLER, STREAM_FEATURE_ORDER, STREAM_SCORES, STREAM_HEAD_SAMPLE = range(5)


def derived_seed(seed: int, epoch: int, stream: int) -> int:
    """A 32-bit seed that is a pure function of (run seed, epoch, stream)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


__all__ = ["STREAM_CLUSTERING", "STREAM_FEATURE_ORDER", "STREAM_HEAD_SAMPLE", "STREAM_SAMPLER", "STREAM_SCORES",
           "derived_seed"]
