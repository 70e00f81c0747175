"""What k-means does with a cluster that received no point: one set of rules for every metric.

Applied after each centroid update, on the global sizes and sums (so the same on every
process). The rules (``empty=``):

- ``split`` (DeepCluster §3.3, as faiss): each empty cluster takes half of a non-empty one.
  A donor is drawn with probability proportional to ``size - 1`` (numpy generator), each
  donor gives at most once per iteration; the two centroids become ``c (1 +- eps s)``
  (``s`` = +1, -1, +1, ... over dimensions) and the donor's points go at once to the nearer
  of the two (the side of ``(x - c).(c s)``); each of the two clusters then moves to its
  centroid of its half (the mean; for the cosine metric the normalised sum). One pass over
  the donors' points and one collective per iteration.
- ``nudge`` (DeepCluster-v2's split): each empty cluster becomes a copy of a donor drawn by
  ``torch.multinomial`` in proportion to ``size - 1``, donor and copy pushed apart to
  ``c (1 +- eps s)`` (then re-normalised for the cosine metric); the donor's size is halved
  for the next draws, so a large cluster may give again; the next assignment divides the
  points between them. No pass over the points.
- ``keep`` (SwAV's reference): an empty cluster keeps its centroid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from deepcluster.clustering.shard import Shard, as_float32_tensor, tie_bits

EMPTY_RULES = ("split", "nudge", "keep")
# Relative perturbation of a split centroid, as faiss's split of empty clusters uses.
SPLIT_EPS = 1.0 / 1024.0
# Rows per pass of the split (bounds its temporary memory).
PASS_ROWS = 1 << 16

# (sums (m, d) float64, counts (m,)) -> (m, d) float32 centroids
Update = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (m, d) float32 -> (m, d) float32: a centroid moved back where the metric wants it
Project = Callable[[torch.Tensor], torch.Tensor]


def means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The L2 centroid update: the mean of each cluster's points."""
    return (sums / counts[:, None]).float()


def check_empty_rule(empty: str) -> str:
    if empty not in EMPTY_RULES:
        raise ValueError(f"unknown empty-cluster policy {empty!r}; choose one of: {', '.join(EMPTY_RULES)}")
    return empty


def sign_pattern(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(+1, -1, +1, ...)`` of length ``dim``: the direction a split pushes centroids apart."""
    return torch.where(torch.arange(dim, device=device) % 2 == 0, 1.0, -1.0)


def choose_donors(counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pair every empty cluster (in index order) with a donor, drawn with probability
    proportional to ``size - 1`` among clusters that have not given yet this round.

    Returns:
        ``(P,)`` int64 targets and ``(P,)`` int64 donors; ``P`` is smaller than the number
        of empty clusters when donors run out (the rest wait for the next iteration).
    """
    empty = np.flatnonzero(counts == 0)
    if len(empty) == 0:
        return empty.astype(np.int64), empty.astype(np.int64)
    weights = np.maximum(counts.astype(np.float64) - 1.0, 0.0)
    targets, donors = [], []
    for target in empty:
        total = weights.sum()
        if total <= 0:
            break  # no cluster left with two points to split
        donor = int(np.searchsorted(np.cumsum(weights), rng.random() * total, side="right"))
        donor = min(donor, len(weights) - 1)
        while weights[donor] <= 0:  # rounding at the very end of the cumulative sum
            donor -= 1
        weights[donor] = 0.0
        targets.append(int(target))
        donors.append(donor)
    return np.asarray(targets, dtype=np.int64), np.asarray(donors, dtype=np.int64)


@dataclass
class SplitOutcome:
    """What one round of splits did."""

    n_split: int
    moved_rows: torch.Tensor  # (M,) local rows that moved to a target, valid pairs only
    moved_to: torch.Tensor  # (M,) their new cluster


@dataclass
class _Pairs:
    """The (target, donor) pairs of one round and the direction each donor splits along."""

    targets: torch.Tensor
    donors: torch.Tensor
    bases: torch.Tensor  # (P, d) the donors' centroids
    directions: torch.Tensor  # (P, d)
    pair_of: torch.Tensor  # (k,) pair index of each donor, -1 elsewhere


def _pairs(targets: np.ndarray, donors: np.ndarray, centroids: torch.Tensor) -> _Pairs:
    device, dim = centroids.device, centroids.shape[1]
    targets_t = torch.from_numpy(targets).to(device)
    donors_t = torch.from_numpy(donors).to(device)
    bases = centroids[donors_t]
    signs = sign_pattern(dim, device)
    directions = bases * signs
    flat = directions.abs().amax(1) == 0  # a zero centroid: perturb along the sign pattern
    directions[flat] = signs
    pair_of = torch.full((len(centroids),), -1, dtype=torch.int64, device=device)
    pair_of[donors_t] = torch.arange(len(targets), device=device)
    return _Pairs(targets_t, donors_t, bases, directions, pair_of)


def _moved_halves(points: torch.Tensor, labels: torch.Tensor, pairs: _Pairs, shard: Shard, salt: int,
                  track_moves: bool) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """Per pair, the local sum and count of the donor's points on the target's side."""
    n_pairs, dim, device = len(pairs.targets), points.shape[1], points.device
    moved_sums = torch.zeros(n_pairs, dim, dtype=torch.float64, device=device)
    moved_counts = torch.zeros(n_pairs, dtype=torch.float64, device=device)
    moved_rows, moved_pairs = [], []
    for start in range(0, len(points), PASS_ROWS):
        which = pairs.pair_of[labels[start:start + PASS_ROWS]]
        members = torch.nonzero(which >= 0).flatten()
        if len(members) == 0:
            continue
        which = which[members]
        block = points[start:start + PASS_ROWS][members]
        # Nearer to base + eps*dir than to base - eps*dir  <=>  (x - base).dir > 0.
        side = ((block - pairs.bases[which]) * pairs.directions[which]).sum(1)
        to_target = side > 0
        tied = side == 0  # duplicates of the donor centroid: a fixed pseudo-random half
        if tied.any():
            to_target[tied] = tie_bits(members[tied] + start + shard.offset, salt)
        moving = torch.nonzero(to_target).flatten()
        moved_sums.index_add_(0, which[moving], block[moving].double())
        moved_counts.index_add_(0, which[moving], torch.ones(len(moving), dtype=torch.float64, device=device))
        if track_moves:
            moved_rows.append(members[moving] + start)
            moved_pairs.append(which[moving])
    return moved_sums, moved_counts, moved_rows, moved_pairs


def split_round(points: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor,
                sums: torch.Tensor, rng: np.random.Generator, shard: Shard, salt: int, track_moves: bool = False,
                update: Update = means, project: Project = lambda c: c) -> SplitOutcome:
    """The ``split`` rule: donors split into the empty clusters, updating ``centroids``,
    ``counts`` and ``sums`` (global ``(k,)`` int64 sizes and ``(k, d)`` float64 sums) in place.

    ``labels`` (this process's rows' clusters) are not modified; with ``track_moves`` the
    outcome says which local rows moved where. ``salt`` varies the tie-breaking bits from
    one call to the next; ``update`` and ``project`` are the metric's.
    """
    targets, donors = choose_donors(counts.cpu().numpy(), rng)
    empty_result = SplitOutcome(0, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    if len(targets) == 0:
        return empty_result
    pairs = _pairs(targets, donors, centroids)
    dim = points.shape[1]
    moved_sums, moved_counts, moved_rows, moved_pairs = _moved_halves(points, labels, pairs, shard, salt, track_moves)
    # One collective for all splits of the round: [sums | count] per pair.
    packed = shard.all_reduce_sum(torch.cat([moved_sums, moved_counts[:, None]], 1))
    moved_sums, moved_counts = packed[:, :dim], packed[:, dim]
    valid = (moved_counts > 0) & (moved_counts < counts[pairs.donors].double())
    if valid.any():
        ok_targets, ok_donors = pairs.targets[valid], pairs.donors[valid]
        ok_moved, ok_sums = moved_counts[valid], moved_sums[valid]
        sums[ok_targets] = ok_sums
        sums[ok_donors] -= ok_sums
        counts[ok_targets] = ok_moved.long()
        counts[ok_donors] -= ok_moved.long()
        centroids[ok_targets] = update(sums[ok_targets], counts[ok_targets])
        centroids[ok_donors] = update(sums[ok_donors], counts[ok_donors])
    # A failed split (every point on one side) leaves the target as a perturbed copy.
    failed = ~valid
    if failed.any():
        centroids[pairs.targets[failed]] = project(pairs.bases[failed] + SPLIT_EPS * pairs.directions[failed])
    if track_moves and moved_rows:
        rows, which = torch.cat(moved_rows), torch.cat(moved_pairs)
        keep = valid[which]
        return SplitOutcome(int(valid.sum()), rows[keep], pairs.targets[which[keep]])
    return SplitOutcome(int(valid.sum()), empty_result.moved_rows, empty_result.moved_to)


def nudge_round(centroids: torch.Tensor, counts: torch.Tensor, generator: torch.Generator,
                project: Project = lambda c: c) -> int:
    """The ``nudge`` rule: every empty cluster re-seeded next to a donor drawn in proportion
    to ``size - 1`` (``counts``: global sizes, not modified); donor and new centroid pushed
    apart by ``SPLIT_EPS`` and passed through ``project``. Returns the number re-seeded."""
    sizes = counts.to(torch.float64).clone()
    if bool((sizes > 0).all()):
        return 0
    n_split = 0
    sign = torch.ones(centroids.shape[1], dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1.0
    for cluster in torch.nonzero(sizes == 0).flatten().tolist():
        weights = (sizes - 1).clamp(min=0)
        if float(weights.sum()) <= 0:
            break
        donor = int(torch.multinomial(weights.cpu().float(), 1, generator=generator))
        base = centroids[donor].clone()
        centroids[cluster] = project(base * (1 + SPLIT_EPS * sign))
        centroids[donor] = project(base * (1 - SPLIT_EPS * sign))
        sizes[cluster] = sizes[donor] / 2
        sizes[donor] -= sizes[cluster]
        n_split += 1
    return n_split


def split_empty_clusters(points: np.ndarray, labels: np.ndarray, centroids: np.ndarray,
                         rng: np.random.Generator) -> int:
    """Re-seed the empty clusters of a labelling by the ``split`` rule (L2), in place.

    Every cluster involved in a split ends at the mean of its points; the donors' points
    are divided between donor and target (``labels`` and ``centroids`` are modified;
    non-empty clusters are set to their means). Returns the number of clusters filled.
    """
    points_t = as_float32_tensor(points)
    labels_t = torch.from_numpy(labels)
    n_clusters = len(centroids)
    counts = torch.bincount(labels_t, minlength=n_clusters)
    sums = torch.zeros(n_clusters, points_t.shape[1], dtype=torch.float64).index_add_(0, labels_t, points_t.double())
    centroids_t = torch.from_numpy(centroids)
    filled = counts > 0
    centroids_t[filled] = (sums[filled] / counts[filled, None]).float()
    outcome = split_round(points_t, labels_t, centroids_t, counts, sums, rng, Shard(0, len(points), len(points)),
                          salt=0, track_moves=True)
    labels_t[outcome.moved_rows] = outcome.moved_to
    return outcome.n_split


__all__ = ["EMPTY_RULES", "SPLIT_EPS", "check_empty_rule", "choose_donors", "means", "nudge_round",
           "split_empty_clusters", "split_round"]
