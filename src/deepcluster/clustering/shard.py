"""The points k-means reads: which rows this process holds, and the few collectives it needs.

k-means treats one process as a world of one: every step reads this process's rows and
reduces over a :class:`Shard`, whose collectives run over the default process group when
it spans processes and are no-ops otherwise. The global point set is the concatenation of
the processes' rows in rank order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deepcluster import distributed


@dataclass
class Shard:
    """This process's rows of the global point set: ``[offset, offset + size)`` of ``total``.

    With ``distributed`` false (one process, or no process group) every collective is a
    no-op and ``offset = 0``, ``size = total``.
    """

    offset: int
    size: int
    total: int
    distributed: bool = False

    @staticmethod
    def of(local_rows: int, distributed_run: bool = True) -> "Shard":
        """This process's shard of the default process group (rank 0 holds the first
        rows), or a world of one when ``distributed_run`` is false or there is no group."""
        if not (distributed_run and distributed.is_distributed()):
            return Shard(0, local_rows, local_rows)
        sizes = distributed.all_gather_ints(local_rows)
        return Shard(sum(sizes[:distributed.rank()]), local_rows, sum(sizes), True)

    @property
    def rank(self) -> int:
        return distributed.rank() if self.distributed else 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(tensor) if self.distributed else tensor

    def all_gather_ints(self, value: int) -> list[int]:
        return distributed.all_gather_ints(value) if self.distributed else [int(value)]

    def all_gather_floats(self, value: float) -> list[float]:
        return distributed.all_gather_floats(value) if self.distributed else [float(value)]

    def gather_rows(self, points: torch.Tensor, global_rows: np.ndarray) -> torch.Tensor:
        """Rows ``global_rows`` of the global point set, on every process (float32, exact)."""
        out = torch.zeros(len(global_rows), points.shape[1], dtype=torch.float32, device=points.device)
        local = (global_rows >= self.offset) & (global_rows < self.offset + self.size)
        if local.any():
            positions = torch.from_numpy(np.flatnonzero(local)).to(points.device)
            rows = torch.from_numpy(global_rows[local] - self.offset).to(points.device)
            out[positions] = points[rows]
        return self.all_reduce_sum(out)


def as_float32_tensor(points: np.ndarray | torch.Tensor, name: str = "points") -> torch.Tensor:
    """A 2-d float32 contiguous tensor sharing memory with ``points`` where possible.

    Raises:
        ValueError: ``points`` is not 2-d.
    """
    if isinstance(points, torch.Tensor):
        tensor = points.detach()
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array (N, d), got shape {tuple(tensor.shape)}")
    return tensor.to(torch.float32).contiguous()


def as_shard(shard: "bool | Shard | None", local_rows: int) -> Shard:
    """A :class:`Shard` from k-means' ``shard`` argument: a Shard as given, ``True`` for this
    process's rows of the default process group, ``False``/``None`` for a world of one."""
    if isinstance(shard, Shard):
        if shard.size != local_rows:
            raise ValueError(f"the shard holds {shard.size} rows but {local_rows} points were given")
        return shard
    return Shard.of(local_rows, bool(shard))


def tie_bits(global_rows: torch.Tensor, salt: int) -> torch.Tensor:
    """A pseudo-random bit per global row index (splitmix64 of ``row + salt``): breaks ties
    of the split the same way whatever process holds the row."""
    mask = (1 << 64) - 1
    value = (global_rows.cpu().numpy().astype(np.uint64) + np.uint64(salt & mask))
    with np.errstate(over="ignore"):
        value = value * np.uint64(0x9E3779B97F4A7C15)
        value ^= value >> np.uint64(30)
        value = value * np.uint64(0xBF58476D1CE4E5B9)
        value ^= value >> np.uint64(27)
    return torch.from_numpy((value >> np.uint64(63)).astype(bool)).to(global_rows.device)


__all__ = ["Shard", "as_float32_tensor", "as_shard", "tie_bits"]
