"""Process-group helpers that are no-ops at world size 1.

Every code path runs unchanged on one CPU: with no initialised process group, rank is 0,
world size is 1, gathering returns the input and barriers return at once.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(indices: np.ndarray) -> np.ndarray:
    """This process's share of ``indices``: every ``world_size``-th item from ``rank``."""
    return indices[rank()::world_size()]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; unchanged at world size 1."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rows(local: np.ndarray, local_indices: np.ndarray, n_total: int) -> np.ndarray:
    """Rebuild the full ``(n_total, ...)`` array from every process's rows.

    Each process holds ``local[i]`` for global row ``local_indices[i]``; rows that no
    process holds are zero. At world size 1 this only places the rows.
    """
    full = np.zeros((n_total,) + local.shape[1:], dtype=local.dtype)
    full[local_indices] = local
    if is_distributed():
        tensor = torch.from_numpy(full)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)  # each row is non-zero on one rank only
        full = tensor.numpy()
    return full
